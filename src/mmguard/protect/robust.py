"""Expectation over the attacker's transformations (EOT), differentiable, for PGD.

A perturbation that only works on the exact saved pixels is undone by the cheap
preprocessing an attacker tries first (Image Shortcut Squeezing, ICML 2023:
grayscale and JPEG restore most error-minimising poisons). With `--robust
jpeg,grayscale,resize,crop,blur`, every PGD step scores the perturbed images
after a transformation drawn from that list (one per step, seeded; with
`--robust-every`, after each of them and none, averaged), so the noise is
optimised to survive them all. These are differentiable stand-ins for
what `attack/augment.py` applies for real:

- jpeg: 8x8 DCT of YCbCr with 4:2:0 chroma, quantised with libjpeg's
  quality-75 tables and really rounded, the gradient passed straight through
  the rounding (BPDA, Athalye et al. 2018). It lands within about 15% of the
  distance between the image and Pillow's real JPEG (tested). A smooth stand-in
  for the rounding, x + (round(x) - x)^3, barely rounds: noise optimised
  through it was undone by real JPEG as fully as noise optimised without it;
- grayscale: BT.601 luma in all three channels;
- resize: down to half size and back (bilinear, antialiased down);
- crop: a random crop of 80-100% of each side, resized back, flipped half the time;
- blur: Gaussian, sigma 1 px.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (3, H, W) -> same

_LUMA = torch.tensor([0.299, 0.587, 0.114])
# libjpeg's base tables (Annex K), scaled to quality 75 below.
_LUMA_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]],
    dtype=torch.float32)
_CHROMA_TABLE = torch.full((8, 8), 99.0)
_CHROMA_TABLE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66],
                                      [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32)


def _quality_table(table: torch.Tensor, quality: int) -> torch.Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return ((table * scale + 50) // 100).clamp(min=1)


def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float32)
    matrix = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix


_DCT = _dct_matrix()


def _straight_through_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity's gradient backward."""
    return x + (torch.round(x) - x).detach()


def _code_blocks(channel: torch.Tensor, table: torch.Tensor, quality: int) -> torch.Tensor:
    """One channel (H, W), sides multiples of 8, through DCT, quantisation and back."""
    dct = _DCT.to(channel.device, channel.dtype)
    q = _quality_table(table, quality).to(channel.device, channel.dtype)
    blocks = (channel - 128).unfold(0, 8, 8).unfold(1, 8, 8)  # (H/8, W/8, 8, 8)
    restored = dct.T @ (_straight_through_round((dct @ blocks @ dct.T) / q) * q) @ dct + 128
    return restored.permute(0, 2, 1, 3).reshape(channel.shape)


def jpeg(image: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Differentiable JPEG of one image in [0, 1], with 4:2:0 chroma like Pillow's default."""
    _, height, width = image.shape
    pad_h, pad_w = (-height) % 16, (-width) % 16
    x = F.pad(image[None], (0, pad_w, 0, pad_h), mode="replicate")[0] * 255
    r, g, b = x[0], x[1], x[2]
    y = _code_blocks(0.299 * r + 0.587 * g + 0.114 * b, _LUMA_TABLE, quality)
    chroma = torch.stack([128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                          128 + 0.5 * r - 0.418688 * g - 0.081312 * b])
    half = F.avg_pool2d(chroma[None], 2)[0]
    coded = torch.stack([_code_blocks(c, _CHROMA_TABLE, quality) for c in half])
    cb, cr = F.interpolate(coded[None], scale_factor=2, mode="bilinear",
                           align_corners=False)[0]
    rgb = torch.stack([y + 1.402 * (cr - 128),
                       y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                       y + 1.772 * (cb - 128)]) / 255
    return rgb[:, :height, :width].clamp(0, 1)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    luma = (_LUMA.to(image.device, image.dtype)[:, None, None] * image).sum(dim=0)
    return luma.expand(3, -1, -1)


def resize_half(image: torch.Tensor) -> torch.Tensor:
    size = image.shape[1:]
    small = F.interpolate(image[None], scale_factor=0.5, mode="bilinear", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]


def crop_flip(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    _, height, width = image.shape
    share = 0.8 + 0.2 * float(torch.rand(1, generator=generator))
    h, w = max(1, round(height * share)), max(1, round(width * share))
    top = int(torch.randint(height - h + 1, (1,), generator=generator))
    left = int(torch.randint(width - w + 1, (1,), generator=generator))
    crop = F.interpolate(image[None, :, top:top + h, left:left + w], size=(height, width),
                         mode="bilinear", align_corners=False)[0]
    return crop.flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else crop


def blur(image: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


TRANSFORMS: dict[str, Transform] = {
    "jpeg": lambda image, generator: jpeg(image),
    "grayscale": lambda image, generator: grayscale(image),
    "resize": lambda image, generator: resize_half(image),
    "crop": crop_flip,
    "blur": lambda image, generator: blur(image),
}


def parse_robust(spec: str) -> tuple[str, ...]:
    """"jpeg,grayscale" -> ("jpeg", "grayscale"); "" -> () (no EOT)."""
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown:
        raise MMGuardError(f"--robust {spec!r}: unknown {', '.join(unknown)}; choose from "
                           f"{', '.join(TRANSFORMS)}")
    return names


def expectation_over(names: Sequence[str], loss: Callable[[list[torch.Tensor]], torch.Tensor],
                     generator: torch.Generator,
                     every: bool = False) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """`loss` of the images after one transformation drawn from `names` (or none) per call;
    with `every`, the mean of `loss` over all of them and none (len(names) + 1 times the cost,
    but no step is spent on a single transformation's direction)."""
    choices = [None, *names]  # the untransformed images stay in the mix

    def transformed(pick: str | None, images: list[torch.Tensor]) -> torch.Tensor:
        if pick is None:
            return loss(images)
        return loss([TRANSFORMS[pick](image, generator) for image in images])

    def robust(images: list[torch.Tensor]) -> torch.Tensor:
        if every:
            return sum(transformed(pick, images) for pick in choices) / len(choices)
        return transformed(choices[int(torch.randint(len(choices), (1,), generator=generator))],
                           images)

    return robust
