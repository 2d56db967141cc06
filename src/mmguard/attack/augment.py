"""Transformations an adaptive attacker applies to protected images before training.

A protection is only worth something if it survives the cheap preprocessing an
attacker would try first: re-encoding as JPEG, down- and up-scaling, dropping colour,
random crops and flips, blurring. Each function here takes one float image (3, H, W)
in [0, 1] and returns a new one of the same shape, dtype and device, in [0, 1].
The only random one, `random_crop_flip`, draws from the given torch.Generator, so an
attack run is reproducible from its seed.

`parse_augment` turns a CLI string such as "resize:0.5,grayscale" into one callable
(image, generator) -> image whose `.spec` (and `__name__`) is the normalized string,
used to label results.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmguard.errors import MMGuardError

Augmentation = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]

# ITU-R BT.601 luma weights (what PIL's convert("L") uses).
_LUMA = (0.299, 0.587, 0.114)


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise MMGuardError(f"expected one RGB image of shape (3, H, W); got "
                           f"{tuple(image.shape)}")
    if not image.is_floating_point():
        raise MMGuardError(f"expected a float image in [0, 1]; got dtype {image.dtype}")


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise MMGuardError(f"JPEG quality must be a whole number from 1 to 100; got {quality!r}")


def _check_factor(factor: float) -> None:
    if not (isinstance(factor, int | float) and math.isfinite(factor) and 0.0 < factor <= 1.0):
        raise MMGuardError(f"resize factor must be in (0, 1]; got {factor!r}")


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0.0):
        raise MMGuardError(f"blur sigma must be a positive number of pixels; got {sigma!r}")


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Round to 8 bits, encode as JPEG at `quality` (1..100) with Pillow, decode.

    Pillow's defaults are kept (4:2:0 chroma subsampling, standard libjpeg tables), as
    an attacker's image pipeline would; so even quality 100 blurs colour slightly.
    """
    _check_image(image)
    _check_quality(quality)
    pixels = torch.round(image.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(buffer, format="JPEG",
                                                                quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.asarray(decoded.convert("RGB")).copy()
    out = torch.from_numpy(array).permute(2, 0, 1).to(image.device, image.dtype) / 255.0
    return out.contiguous()


def resize(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale down by `factor` in (0, 1] and back up to the original size (bilinear).

    The downscale is antialiased, so detail finer than the small image can hold is
    averaged away rather than aliased into it. Sides never drop below one pixel.
    """
    _check_image(image)
    _check_factor(factor)
    height, width = image.shape[1:]
    small = (max(1, round(height * factor)), max(1, round(width * factor)))
    if small == (height, width):
        return image.detach().clamp(0.0, 1.0).clone()
    batch = image.detach()[None]
    down = F.interpolate(batch, size=small, mode="bilinear", align_corners=False, antialias=True)
    up = F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False,
                       antialias=True)
    return up[0].clamp(0.0, 1.0)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), copied to all three channels."""
    _check_image(image)
    # float64 so that a gray pixel (R = G = B) comes back bit-identical.
    weights = torch.tensor(_LUMA, dtype=torch.float64, device=image.device)
    luma = torch.tensordot(weights, image.detach().to(torch.float64), dims=1)
    return luma.to(image.dtype).clamp(0.0, 1.0).expand(3, -1, -1).contiguous()


def random_crop_flip(image: torch.Tensor, generator: torch.Generator | None,
                     scale: tuple[float, float] = (0.8, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random resized crop back to the original size, then a horizontal flip with p = 1/2.

    The crop covers a fraction of the area drawn uniformly from `scale`; its aspect
    ratio is the image's own times a factor drawn log-uniformly from `ratio` (so
    ratio=(1, 1) keeps the shape; torchvision's RandomResizedCrop uses an absolute
    ratio instead). Sides are clipped to the image. Always five draws from `generator`,
    so the stream of later images does not depend on this one's size.
    """
    _check_image(image)
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise MMGuardError(f"crop scale must satisfy 0 < low <= high <= 1; got {scale!r}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise MMGuardError(f"crop ratio must satisfy 0 < low <= high; got {ratio!r}")
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    height, width = image.shape[1:]
    area = (low + (high - low) * u[0]) * height * width
    stretch = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    aspect = width / height * stretch
    crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
    crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
    top = min(height - crop_h, int(u[2] * (height - crop_h + 1)))
    left = min(width - crop_w, int(u[3] * (width - crop_w + 1)))
    out = image.detach()[:, top:top + crop_h, left:left + crop_w]
    if (crop_h, crop_w) != (height, width):
        out = F.interpolate(out[None], size=(height, width), mode="bilinear",
                            align_corners=False, antialias=True)[0]
    if u[4] < 0.5:
        out = out.flip(-1)
    return out.clamp(0.0, 1.0).contiguous()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel radius ceil(3 sigma), edges padded by replication.

    Replication (not reflection) works for any image size, even smaller than the kernel.
    """
    _check_image(image)
    _check_sigma(sigma)
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(image.device, image.dtype)
    batch = F.pad(image.detach()[None], (radius, radius, radius, radius), mode="replicate")
    batch = F.conv2d(batch, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    batch = F.conv2d(batch, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return batch[0].clamp(0.0, 1.0)


# name -> (value kind, usage shown in error messages)
_STEPS: dict[str, tuple[str | None, str]] = {
    "jpeg": ("quality", "jpeg:Q (JPEG quality Q, a whole number 1..100)"),
    "resize": ("factor", "resize:F (down by F in (0, 1], then back up)"),
    "grayscale": (None, "grayscale"),
    "crop-flip": (None, "crop-flip (random resized crop, area 80-100%, and flip)"),
    "blur": ("sigma", "blur:S (Gaussian blur, sigma S > 0 pixels)"),
    "none": (None, "none (no change; only on its own)"),
}


def _valid_steps() -> str:
    return "valid steps: " + ", ".join(usage for _, usage in _STEPS.values())


class AugmentPipeline:
    """Steps applied in order; call as pipeline(image, generator)."""

    def __init__(self, spec: str, steps: list[Augmentation]):
        self.spec = spec
        self.__name__ = spec
        self._steps = steps

    def __call__(self, image: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        _check_image(image)
        out = image.detach().clamp(0.0, 1.0).clone()
        for step in self._steps:
            out = step(out, generator)
        return out

    def __repr__(self) -> str:
        return f"AugmentPipeline({self.spec!r})"


def _parse_step(raw: str, spec: str) -> tuple[str, Augmentation | None]:
    """One 'name[:value]' -> (normalized text, function or None for 'none')."""
    name, sep, value = (part.strip() for part in raw.partition(":"))
    name = name.lower()

    def bad(problem: str) -> MMGuardError:
        return MMGuardError(f"augmentation step {raw.strip()!r} in {spec!r}: {problem}; "
                            f"{_valid_steps()}")

    if name not in _STEPS:
        raise bad("unknown step")
    kind = _STEPS[name][0]
    if kind is None:
        if sep:
            raise bad(f"{name} takes no value")
        if name == "grayscale":
            return name, lambda image, _gen: grayscale(image)
        if name == "crop-flip":
            return name, random_crop_flip
        return name, None
    if not value:
        raise bad(f"{name} needs a value, like {_STEPS[name][1].split(' ')[0]}")
    if kind == "quality":
        try:
            quality = int(value)
        except ValueError:
            raise bad("the quality must be a whole number from 1 to 100") from None
        if not 1 <= quality <= 100:
            raise bad(f"quality {quality} is outside 1..100")
        return f"jpeg:{quality}", lambda image, _gen: jpeg(image, quality)
    try:
        number = float(value)
    except ValueError:
        raise bad(f"{value!r} is not a number") from None
    if kind == "factor":
        if not (math.isfinite(number) and 0.0 < number <= 1.0):
            raise bad(f"factor {value} is outside (0, 1]")
        return f"resize:{number:.12g}", lambda image, _gen: resize(image, number)
    if not (math.isfinite(number) and number > 0.0):
        raise bad(f"sigma {value} is not a positive number")
    return f"blur:{number:.12g}", lambda image, _gen: gaussian_blur(image, number)


def parse_augment(spec: str) -> AugmentPipeline:
    """'jpeg:75', 'resize:0.5,grayscale', 'crop-flip', 'blur:1.0', 'none' -> a pipeline.

    Steps are comma-separated and applied left to right. Names are case-insensitive
    and values are normalized in `.spec` ('Resize:0.50, blur:1.0' -> 'resize:0.5,blur:1').
    """
    raws = str(spec).split(",")
    if not str(spec).strip():
        raise MMGuardError(f"empty augmentation spec; {_valid_steps()}")
    names: list[str] = []
    steps: list[Augmentation] = []
    for raw in raws:
        if not raw.strip():
            raise MMGuardError(f"augmentation spec {spec!r} has an empty step; "
                               f"{_valid_steps()}")
        text, function = _parse_step(raw, spec)
        names.append(text)
        if function is not None:
            steps.append(function)
    if "none" in names and len(names) > 1:
        raise MMGuardError(f"augmentation spec {spec!r}: 'none' means no augmentation and "
                           f"cannot be combined with other steps; {_valid_steps()}")
    return AugmentPipeline(",".join(names), steps)
