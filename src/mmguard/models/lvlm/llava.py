"""LLaVA (`LlavaForConditionalGeneration`): CLIP ViT -> MLP projector -> a Llama-type LM.

Image processor: `CLIPImageProcessor` as llava-hf checkpoints configure it,
torchvision backend (the one `AutoProcessor` loads): the shortest edge resized
to `size` (bicubic), a centre crop to `crop_size`, rescale, OpenAI CLIP
normalisation; `LlavaImageProcessor`'s optional pad-to-square comes first.
There is one image token per vision patch (the CLS token is dropped by the
"default" feature strategy, kept by "full"), in the row-major order of CLIP's
patch grid, so each covers one patch_size x patch_size square of the processed
image, and a kept CLS token, first, sees all of it. LLaVA-NeXT's anyres tiling
(`LlavaNextForConditionalGeneration`) is another family, not supported here.

Chat template (llava-hf/llava-1.5): `USER: <image>\\n{prompt} ASSISTANT: {response}</s>`,
the end of turn being the tokenizer's eos token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import IMAGE, TEMPLATE, PixelInputs, Segment
from mmguard.models.lvlm.hf_common import (
    HFAdapter,
    TokenRegions,
    block_labels,
    build_tiny,
    normalize,
    response_segment,
    tiny_llama_config,
    tiny_tokenizer,
    torch_resize,
)


class LlavaAdapter(HFAdapter):
    """The LVLM contract for LLaVA-1.5-style checkpoints (and `llava-tiny`).

    Example:
        adapter = create_lvlm("llava-hf/llava-1.5-7b-hf", device="cuda")
        out = adapter.loss([image], [TextExample("What is this?", "a sneaker")])
    """

    def __init__(self, name: str, model: nn.Module, tokenizer, image_processor):
        self.end_of_turn = tokenizer.eos_token
        super().__init__(name, model, tokenizer, image_processor)
        self.image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_index)

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + int(self.model.config.vision_feature_select_strategy == "full")

    # -- the image processor ---------------------------------------------------
    def pixel_inputs(self, images: Sequence[torch.Tensor]) -> PixelInputs:
        processor = self.image_processor
        filter_name, mean, std = self._pixel_settings()
        processed = []
        for image in images:
            x = image[None]
            if getattr(processor, "do_pad", False):
                x = _pad_to_square(x, [int(m * 255) / 255 for m in mean])
            height, width = _clip_resize_size(x.shape[-2], x.shape[-1], processor.size) \
                if processor.do_resize else x.shape[-2:]
            x = torch_resize(x, height, width, filter_name)  # also rounds to 8 bits
            if processor.do_center_crop:
                x = _center_crop(x, processor.crop_size.height, processor.crop_size.width)
            processed.append(normalize(x[0], mean, std))
        return self.pixels_to_device({"pixel_values": torch.stack(processed)},
                                     [self.tokens_per_image()] * len(images))

    def token_regions(self, pixels: PixelInputs) -> list[TokenRegions]:
        """One token per patch_size x patch_size square of the processed image, in the
        order CLIP flattens its patch grid (row-major); with the "full" strategy the CLS
        token comes first and attends to every patch, so it covers the whole image."""
        values = pixels.tensors["pixel_values"]  # (B, 3, H, W)
        strategy = self.model.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise MMGuardError(f"{self.name}: unknown vision_feature_select_strategy "
                               f"{strategy!r}")
        cls = int(strategy == "full")
        patch = self.model.config.vision_config.patch_size
        labels = block_labels(values.shape[-2], values.shape[-1], patch, first=cls)[None]
        count = (values.shape[-2] // patch) * (values.shape[-1] // patch) + cls
        whole = (0,) if cls else ()
        return [TokenRegions(index, labels, count, whole) for index in range(len(values))]

    # -- text ------------------------------------------------------------------
    def template(self, prompt: list[Segment], image_tokens: int,
                 response: str | None) -> list[Segment]:
        segments = [("USER: ", TEMPLATE), (self.image_token * image_tokens, IMAGE),
                    ("\n", TEMPLATE), *prompt, (" ASSISTANT:", TEMPLATE)]
        if response is not None:
            segments.append(response_segment(response, self.end_of_turn, space=True))
        return segments


def _clip_resize_size(height: int, width: int, size) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`."""
    if size.shortest_edge and not size.longest_edge:
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(size.shortest_edge * long / short)
        return (size.shortest_edge, new_long) if height <= width else (new_long, size.shortest_edge)
    if size.height and size.width:
        return size.height, size.width
    raise MMGuardError(f"unsupported CLIP processor size {size}")


def _center_crop(x: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """The torchvision backend's centre crop: zero padding first if the crop is larger."""
    height, width = x.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = x.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return x[..., top:top + crop_h, left:left + crop_w]


def _pad_to_square(x: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """`LlavaImageProcessor.pad_to_square`: centred, filled with the 8-bit mean colour."""
    height, width = x.shape[-2:]
    side = max(height, width)
    if height == width:
        return x
    canvas = torch.tensor(list(fill), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    canvas = canvas.expand(x.shape[0], -1, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[..., top:top + height, left:left + width] = x
    return canvas


def tiny_llava(seed: int = 0) -> LlavaAdapter:
    """`llava-tiny`: a random CLIP ViT (28 px, 7 px patches: 16 image tokens), the real
    projector and a two-layer random Llama with SmolLM2's tokenizer plus `<image>`."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny_tokenizer(["<image>"])
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28,
              "patch_size": 7, "projection_dim": 32}
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(len(tokenizer)),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=16, vision_feature_layer=-2)
    processor = CLIPImageProcessor(size={"shortest_edge": 28},
                                   crop_size={"height": 28, "width": 28})
    return LlavaAdapter("llava-tiny", build_tiny(LlavaForConditionalGeneration, config, seed),
                        tokenizer, processor)
