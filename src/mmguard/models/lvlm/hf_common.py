"""What the Hugging Face LVLM adapters share: torchvision's resize, the adapter base, tiny parts.

Image processors. transformers 5 builds every image processor on a backend;
`AutoImageProcessor` / `AutoProcessor` pick the torchvision one whenever
torchvision is installed (the "fast" processors of transformers 4). It turns
the decoded 8-bit image into a uint8 tensor and resizes it with
`torchvision.transforms.v2.functional.resize(antialias=True)`, which on a CPU
runs PyTorch's native uint8 kernel: Pillow's filters and support, but weights
rounded to int16 at a per-axis precision, the width pass first, each pass
rounded back to uint8. `torch_resize` reproduces that kernel bit for bit in its
forward pass and is differentiable through the float weights (a straight-through
estimate of the rounding). The "slow" `...ImageProcessorPil` classes resize
with Pillow (as `mmguard.models.preprocess` does), one or two levels away here
and there: 0.008 to 0.06 normalised units on the emoji images, too much to call
them the same processor, so the adapters match the default one only.

The adapter base runs a model's backbone (`model.model`) once with the
family's inputs and applies the LM head only where a response token follows,
returns the language model's attention maps (eager attention), generates with
`model.generate` on left-padded prompts, and prepends the tokenizer's own
special prefix (Llama's `<s>`) exactly as a data loader calling the tokenizer
would.

Token regions. MMGuard's perturbation tokens (Eqs 21-23) rank image tokens by
the mean |change| of the processed pixels each one covers. Every family says
which pixels of its own `pixel_values` each image token covers
(`token_regions`, a `TokenRegions` per image: a label map of the pixels, in
the layout of that tensor); the base measures the change there, so the
measurement is in the pixels the vision tower reads, whatever the layout
(LLaVA's images, Qwen2-VL's flattened patches, Idefics3's tiles).
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import (
    ANSWER,
    TEMPLATE,
    EncodedBatch,
    LVLMAdapter,
    PixelInputs,
    TextExample,
    answer_positions,
)
from mmguard.models.preprocess import _kernel, _round_8bit

# PILImageResampling values (what an image processor stores in `resample`) -> filter name.
RESAMPLE_FILTERS = {1: "lanczos", 2: "bilinear", 3: "bicubic"}
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}


# -- torchvision's uint8 resize, differentiably --------------------------------------------------
def _filter(name: str, x: float) -> float:
    if name != "lanczos":
        return _kernel(name, x)
    x = abs(x)
    if x >= 3.0:
        return 0.0
    return _sinc(x) * _sinc(x / 3.0)


def _sinc(x: float) -> float:
    return 1.0 if x == 0.0 else math.sin(math.pi * x) / (math.pi * x)


@functools.lru_cache(maxsize=256)
def torch_resample_weights(in_size: int, out_size: int,
                           filter_name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(out, in) float weights, the same weights as int16 integers, and their precision in bits.

    PyTorch's `HelperInterpBase::_compute_index_ranges_int16_weights`
    (aten/src/ATen/native/cpu/UpSampleKernel.cpp): Pillow's support and
    centring, weights normalised in double, then scaled by 2**precision with the
    largest precision (< 22 bits) that keeps the largest weight of the axis
    within int16, and rounded half away from zero.
    """
    scale = in_size / out_size
    support = _SUPPORT[filter_name] * scale if scale >= 1.0 else _SUPPORT[filter_name]
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    largest = 0.0
    for out in range(out_size):
        center = scale * (out + 0.5)
        lo = max(int(center - support + 0.5), 0)
        size = min(max(min(int(center + support + 0.5), in_size) - lo, 0), taps)
        row = [_filter(filter_name, (j + lo - center + 0.5) * invscale) for j in range(size)]
        total = sum(row)
        if total != 0.0:
            row = [w / total for w in row]
            largest = max(largest, *row)
        weights[out, lo:lo + size] = torch.tensor(row, dtype=torch.float64)
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    integers = torch.where(scaled < 0, -torch.floor(0.5 - scaled), torch.floor(0.5 + scaled))
    return weights.to(torch.float32), integers, precision


def _resample_last_dim(x: torch.Tensor, out_size: int, filter_name: str) -> torch.Tensor:
    """One uint8 pass along the last dimension; `x` is on the 8-bit grid, in [0, 1]."""
    weights, integers, precision = torch_resample_weights(x.shape[-1], out_size, filter_name)
    smooth = x @ weights.to(x).T
    with torch.no_grad():
        levels = torch.round(x.detach().double() * 255.0)
        acc = levels @ integers.to(levels.device).T + float(1 << (precision - 1))
        exact = (torch.floor(acc / float(1 << precision)).clamp(0.0, 255.0) / 255.0).to(x.dtype)
    return smooth + (exact - smooth).detach()


def torch_resize(batch: torch.Tensor, new_h: int, new_w: int,
                 filter_name: str = "bicubic") -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, C, new_h, new_w), as torchvision resizes uint8 tensors
    on a CPU with `antialias=True` (width pass first, both passes rounded to uint8).

    The input is first rounded to the 8-bit grid (straight through): the
    attacker's loader only ever sees the 8-bit file.
    """
    x = _round_8bit(batch)
    if new_w != x.shape[-1]:
        x = _resample_last_dim(x, new_w, filter_name)
    if new_h != x.shape[-2]:
        x = _resample_last_dim(x.transpose(-1, -2), new_h, filter_name).transpose(-1, -2)
    return x


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (-1, 1, 1)
    mean_t = torch.tensor(list(mean), dtype=batch.dtype, device=batch.device).view(shape)
    std_t = torch.tensor(list(std), dtype=batch.dtype, device=batch.device).view(shape)
    return (batch - mean_t) / std_t


def resample_filter(image_processor) -> str:
    resample = getattr(image_processor, "resample", 3)
    name = RESAMPLE_FILTERS.get(int(resample))
    if name is None:
        raise MMGuardError(f"resample mode {resample!r} has no differentiable version")
    return name


# -- which processed pixels each image token covers ---------------------------------------------
@dataclass(frozen=True)
class TokenRegions:
    """Which of one image's processed pixels each of its `count` image tokens covers.

    `rows` selects the image's part of `pixel_values` (an index or a slice of its
    first dimension). `labels` has the shape of that part, except that it is 1
    along the dimensions every token sees whole (the colour channels, Qwen2-VL's
    temporal copies), which are averaged; each entry is the image token whose
    patch holds the pixel, -1 for none (a padding tile, a margin no patch
    reaches). `whole` lists the tokens that see every pixel (LLaVA's CLS). Token
    indices are in the order of the image tokens in the sequence.
    """

    rows: int | slice
    labels: torch.Tensor
    count: int
    whole: tuple[int, ...] = ()


def block_labels(height: int, width: int, block: int, first: int = 0) -> torch.Tensor:
    """(H, W) long: the index of the block x block square holding each pixel, row-major
    from `first`, as a ViT's patch grid is flattened; -1 past the last whole block
    (a stride-`block` convolution never reads those pixels)."""
    rows, cols = height // block, width // block
    row = torch.arange(height) // block
    col = torch.arange(width) // block
    labels = first + row[:, None] * cols + col[None, :]
    inside = (row < rows)[:, None] & (col < cols)[None, :]
    return torch.where(inside, labels, -1)


def region_means(change: torch.Tensor, regions: TokenRegions) -> torch.Tensor:
    """(count,) the mean of `change` (one image's part of |Δ pixel_values|) over each
    token's pixels; a token in `whole` gets the mean over every covered pixel."""
    labels = regions.labels.to(change.device)
    seen_whole = [d for d in range(change.dim())
                  if labels.shape[d] == 1 and change.shape[d] > 1]
    per_pixel = change.mean(dim=seen_whole, keepdim=True) if seen_whole else change
    if per_pixel.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not fit pixels {tuple(change.shape)}")
    flat, tokens = per_pixel.reshape(-1), labels.reshape(-1)
    covered = tokens >= 0
    flat, tokens = flat[covered], tokens[covered]
    sums = torch.zeros(regions.count, dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, tokens, flat)
    means = sums / torch.bincount(tokens, minlength=regions.count).clamp(min=1)
    for token in regions.whole:
        means[token] = flat.mean()
    return means


# -- the adapter base ----------------------------------------------------------------------------
class HFAdapter(LVLMAdapter):
    """A Hugging Face `...ForConditionalGeneration` behind the LVLM contract.

    Subclasses give the family's image processor (`pixel_inputs`), chat
    template (`template`), end-of-turn marker and where the vision tower and the
    projector live; running, generation and attacker recipes are shared.
    `image_processor` is the real Hugging Face image processor object, read
    for its settings (sizes, mean and std, filter), never called.
    """

    end_of_turn: str  # the token that closes the assistant's turn

    def __init__(self, name: str, model: nn.Module, tokenizer, image_processor):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._prefix_ids = special_prefix_ids(tokenizer)
        self._prefix_text = tokenizer.decode(self._prefix_ids) if self._prefix_ids else ""
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)

    # -- where things are (per family) -------------------------------------------------------
    @abstractmethod
    def vision_tower(self) -> nn.Module:
        """The vision encoder (frozen by the "full" recipe)."""

    @abstractmethod
    def projector(self) -> nn.Module:
        """The modality connector (what the "projector" recipe trains)."""

    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder whose attention projections LoRA adapts."""

    @abstractmethod
    def token_regions(self, pixels: PixelInputs) -> list[TokenRegions]:
        """Per image, which parts of `pixels.tensors["pixel_values"]` its image tokens cover,
        as the family's vision tower and projector turn pixels into tokens."""

    def model_inputs(self, batch: EncodedBatch, pixels: PixelInputs) -> dict[str, torch.Tensor]:
        """Keyword arguments of the Hugging Face model's `forward` / `generate` for a batch
        (Qwen2-VL adds its modality types for M-RoPE)."""
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                **pixels.tensors}

    # -- shared ------------------------------------------------------------------------------
    def _pixel_settings(self) -> tuple[str, Sequence[float], Sequence[float]]:
        """The processor's filter, mean and std; only standard 1/255 rescaling is supported."""
        processor = self.image_processor
        if not processor.do_rescale or abs(processor.rescale_factor - 1 / 255) > 1e-9:
            raise MMGuardError(f"{self.name}: only 1/255 rescaling is supported")
        if not processor.do_normalize:
            return resample_filter(processor), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return resample_filter(processor), processor.image_mean, processor.image_std

    def image_token_change(self, clean: PixelInputs,
                           protected: PixelInputs) -> list[torch.Tensor]:
        """The mean |change| of `pixel_values` over each token's region (`token_regions`).

        Both inputs must be the same images processed alike (same sizes, grids and
        tiles), as clean and protected versions of one batch are.
        """
        if not same_layout(clean, protected):
            raise MMGuardError(f"{self.name}: the clean and protected images were processed "
                               "to different layouts; their pixels cannot be compared")
        change = (protected.tensors["pixel_values"].detach().float()
                  - clean.tensors["pixel_values"].detach().float()).abs()
        rho = [region_means(change[regions.rows], regions)
               for regions in self.token_regions(protected)]
        counts = [len(values) for values in rho]
        if counts != list(protected.tokens_per_image):
            raise MMGuardError(f"{self.name}: regions for {counts} image tokens, the sequence has "
                               f"{list(protected.tokens_per_image)}")
        return rho

    def _encode_one(self, example: TextExample,
                    image_tokens: int) -> tuple[list[int], list[int], str]:
        """The base tokenisation, after the special prefix (`<s>`) the tokenizer itself adds."""
        ids, roles, text = super()._encode_one(example, image_tokens)
        prefix = self._prefix_ids
        return prefix + ids, [TEMPLATE] * len(prefix) + roles, self._prefix_text + text

    def _run(self, batch, pixels, output_attentions):
        # The backbone (`model.model`) rather than the full model, so that the LM head
        # runs only on the response positions instead of the whole (B, L, V) logits.
        out = self.model.model(**self.model_inputs(batch, pixels),
                               output_attentions=output_attentions, use_cache=False,
                               return_dict=True)
        hidden = out.last_hidden_state[answer_positions(batch.labels)]
        logits = self.model.get_output_embeddings()(hidden)  # only where a response token follows
        return logits, out.attentions if output_attentions else None

    @torch.no_grad()
    def _generate_ids(self, batch, pixels, max_new_tokens):
        output = self.model.generate(**self.model_inputs(batch, pixels),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=self.end_of_turn_id,
                                     pad_token_id=self.pad_token_id)
        return output[:, batch.input_ids.shape[1]:]

    def trainable_parameters(self, recipe: str) -> list[nn.Parameter]:
        """The "projector" recipe trains the modality connector; "full" trains everything
        but the vision encoder (the connector included, even where it sits inside it)."""
        if recipe == "projector":
            return list(self.projector().parameters())
        if recipe == "full":
            keep = {id(p) for p in self.projector().parameters()}
            frozen = {id(p) for p in self.vision_tower().parameters()} - keep
            return [p for p in self.model.parameters() if id(p) not in frozen]
        raise MMGuardError(f"{self.name} supports the projector, lora and full recipes, "
                           f"not {recipe!r}")

    def lora_target_modules(self, include_mlp: bool = False) -> list[str]:
        """Full names of the language model's projections, so that peft leaves the
        vision encoder's identically named q/k/v projections alone."""
        wanted = set(super().lora_target_modules(include_mlp))
        language = {id(m) for m in self.language_model().modules()}
        return [name for name, module in self.model.named_modules()
                if id(module) in language and name.rsplit(".", 1)[-1] in wanted]

    def pixels_to_device(self, tensors: dict[str, torch.Tensor],
                         tokens_per_image: list[int]) -> PixelInputs:
        return PixelInputs({k: v.to(self.device) for k, v in tensors.items()}, tokens_per_image)


def same_layout(first: PixelInputs, second: PixelInputs) -> bool:
    """True when two processed batches have the same tensors, shapes, integer
    contents (grids, masks) and image-token counts."""
    if list(first.tokens_per_image) != list(second.tokens_per_image):
        return False
    if first.tensors.keys() != second.tensors.keys():
        return False
    for key, value in first.tensors.items():
        other = second.tensors[key]
        if value.shape != other.shape:
            return False
        if not value.is_floating_point() and not torch.equal(value, other.to(value.device)):
            return False
    return True


def special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by default (Llama's `<s>`; none for ChatML)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
        return list(full[:len(full) - len(plain)])
    return []


def response_segment(response: str, end_of_turn: str, space: bool) -> tuple[str, int]:
    """The assistant's answer and the end-of-turn marker, both learned (ANSWER)."""
    return ((" " if space else "") + response + end_of_turn, ANSWER)


# -- tiny random models for tests ----------------------------------------------------------------
def tiny_tokenizer(special_tokens: Sequence[str]):
    """SmolLM2's tokenizer (a fresh copy: tokens are added to it) plus a family's tokens."""
    from mmguard.models.lvlm.smollm import load_tokenizer

    tokenizer = load_tokenizer()
    missing = [t for t in special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    return tokenizer


def tiny_llama_config(vocab_size: int) -> dict[str, Any]:
    """A two-layer Llama text config, hidden 64 (the language model of tiny LLaVA/Idefics3)."""
    return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 1024,
            "tie_word_embeddings": False}


def build_tiny(model_class, config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_class._from_config(config, attn_implementation="eager", dtype=torch.float32)
