"""Differentiable image preprocessing: the model's own transform, in torch.

Protection optimises pixels at the image's stored resolution, so the model's
resize / centre crop / normalise must be differentiable and applied *after*
the perturbation, exactly as the attacker's data loader will apply it to the
released file. This mirrors open_clip's evaluation transform (torchvision
Resize on the shortest side, CenterCrop, Normalize) on PIL images.

Resizing is two matrix products with the weights of Pillow's own resampler
(a separable convolution, support widened when downscaling), in the pass order
the installed Pillow uses, rounding to 8 bits after each pass as Pillow does.
`F.interpolate` is not used: torch's bicubic has another kernel constant
(-0.75 against Pillow's -0.5), which put it up to 0.13 normalised units away
from the real transform when upscaling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _kernel(name: str, x: float) -> float:
    x = abs(x)
    if name == "bilinear":
        return max(0.0, 1.0 - x)
    a = -0.5  # Pillow's bicubic constant
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _round_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid in the forward pass, identity in the backward pass.

    The straight-through gradient lets PGD see through the rounding that the
    attacker's Pillow loader really applies.
    """
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


@functools.lru_cache(maxsize=256)
def resample_matrix(in_size: int, out_size: int, filter_name: str) -> torch.Tensor:
    """(out_size, in_size) weights of Pillow's 1-D resampling (libImaging/Resample.c)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _SUPPORT[filter_name] * filter_scale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        row = [_kernel(filter_name, (x + lo - center + 0.5) / filter_scale)
               for x in range(hi - lo)]
        total = math.fsum(row)
        for offset, value in enumerate(row):
            weights[out, lo + offset] = value / total if total else 0.0
    return weights.to(torch.float32)


def _two_pass(batch: torch.Tensor, new_h: int, new_w: int, filter_name: str,
              vertical_first: bool) -> torch.Tensor:
    """Pillow's separable resize: each pass clips the overshoot and rounds to 8 bits."""
    height, width = batch.shape[-2:]

    def horizontal(x):
        cols = resample_matrix(width, new_w, filter_name).to(x)
        return _round_8bit((x @ cols.T).clamp(0.0, 1.0)) if new_w != width else x

    def vertical(x):
        rows = resample_matrix(height, new_h, filter_name).to(x)
        return _round_8bit((rows @ x).clamp(0.0, 1.0)) if new_h != height else x

    return horizontal(vertical(batch)) if vertical_first else vertical(horizontal(batch))


@functools.lru_cache(maxsize=4096)
def pillow_resizes_vertically_first(height: int, width: int, new_h: int, new_w: int,
                                    filter_name: str) -> bool:
    """Which pass the installed Pillow runs first for this size change.

    Pillow has run the horizontal pass first for years, but recent releases run
    the vertical one first when the height shrinks much more than the width,
    by a rule that may change again. Rather than copy the rule, resize a random
    probe image with Pillow once per size pair and keep the order that
    reproduces it.
    """
    from PIL import Image

    if new_h == height or new_w == width:
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    expected = torch.from_numpy(np.asarray(
        Image.fromarray(probe.permute(1, 2, 0).numpy()).resize((new_w, new_h),
                                                               resample[filter_name])).copy())
    expected = expected.permute(2, 0, 1).float()
    errors = [(_two_pass(probe[None].float() / 255, new_h, new_w, filter_name, order)[0] * 255
               - expected).abs().gt(0.5).sum().item() for order in (False, True)]
    return errors[1] < errors[0]


def resize(batch: torch.Tensor, new_h: int, new_w: int, filter_name: str = "bicubic"):
    """(B, 3, H, W) in [0, 1] -> (B, 3, new_h, new_w), as Pillow resizes 8-bit images."""
    height, width = batch.shape[-2:]
    order = pillow_resizes_vertically_first(height, width, new_h, new_w, filter_name)
    return _two_pass(batch, new_h, new_w, filter_name, order)


@dataclass(frozen=True)
class ImagePreprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def resize_crop(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, size, size) in [0, 1], before normalisation."""
        height, width = batch.shape[-2:]
        short, long = (height, width) if height <= width else (width, height)
        # torchvision: the short side becomes `size`, the long side int(size * long / short).
        new_long = int(self.size * long / short)
        new_h, new_w = (self.size, new_long) if height <= width else (new_long, self.size)
        if (new_h, new_w) != (height, width):
            batch = resize(batch, new_h, new_w, self.interpolation)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return batch[..., top:top + self.size, left:left + self.size]

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=batch.dtype, device=batch.device)[:, None, None]
        std = torch.tensor(self.std, dtype=batch.dtype, device=batch.device)[:, None, None]
        return (batch - mean) / std

    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images of any sizes (a list, or a stacked batch) -> (B, 3, size, size) normalised."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return self.normalize(self.resize_crop(images))
        # Same-size images (the common case) go through one interpolate call.
        if len({tuple(image.shape[-2:]) for image in images}) == 1:
            return self.normalize(self.resize_crop(torch.stack(list(images))))
        return self.normalize(torch.cat([self.resize_crop(image[None]) for image in images]))
