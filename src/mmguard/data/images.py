"""Reading images as RGB at their stored resolution, and writing 8-bit PNGs.

Every conversion is explicit: EXIF orientation is applied (what a viewer
shows is what gets protected), grayscale and palette images become RGB,
transparency is composited on white, CMYK is converted with Pillow's
conversion. Nothing is resized: models resize inside their own differentiable
preprocessing.

That composited RGB image is what every model sees. An image with
transparency is also kept as stored, colour and alpha (`load_image`), so a
release can give the owner back a transparent image with its alpha untouched.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mmguard.data.records import ImageRef
from mmguard.errors import BadItemError

_WHITE = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PNG_MODES = {3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class DecodedImage:
    """An image as models see it and, for one with transparency, as it is stored.

    `rgb` is RGB with transparency composited on white; `colour` holds the
    stored, un-composited colour values (the same tensor as `rgb` for an
    opaque image) and `alpha` the alpha channel (None for an opaque image).
    All uint8, (3, H, W) and (1, H, W).
    """

    rgb: torch.Tensor
    colour: torch.Tensor
    alpha: torch.Tensor | None = None

    @property
    def stored(self) -> torch.Tensor:
        """What a release writes back: RGBA (4, H, W) with transparency, else RGB."""
        return self.rgb if self.alpha is None else torch.cat([self.colour, self.alpha])


def check_image_file(ref: ImageRef, item: str) -> None:
    """Cheap checks that need no decoding: the file exists, is a file, is not empty."""
    if ref.path is None:
        return
    path = ref.path
    if not path.exists():
        raise BadItemError(item, f"image file not found: {path}")
    if not path.is_file():
        raise BadItemError(item, f"image path is not a file: {path}")
    if path.stat().st_size == 0:
        raise BadItemError(item, f"image file is empty (0 bytes): {path}")


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel, or palette entries / a PNG tRNS colour key marking pixels transparent."""
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB")
                                          and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency on white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        # Palette entries or a PNG tRNS colour key can mark pixels transparent.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits rather than clipping at 255. Mode
        # "I" (32-bit) does not say its range; values above 255 mean 16-bit.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
        array8 = np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array8, mode="L").convert("RGB")
    if image.mode == "F":
        array8 = np.clip(np.round(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array8, mode="L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions.
    return image.convert("RGB")


def open_pil(ref: ImageRef, item: str) -> Image.Image:
    """Decode the image fully (so truncation is caught here) and orient it."""
    check_image_file(ref, item)
    try:
        # Decompression bombs are a real risk with scraped folders: Pillow's
        # size warning becomes an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if ref.path is not None:
                with Image.open(ref.path) as handle:
                    handle.load()
                    image = handle.copy()  # copies info: transparency, exif
            else:
                image = ref.opener()
                image.load()
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise BadItemError(item, "not a recognised image format "
                                 "(Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise BadItemError(item, f"cannot decode image: {exc}") from None


def shorter_side(ref: ImageRef) -> int | None:
    """The image's shorter side in pixels, from its header where it is a file; None if it
    cannot be read (a protect run reports bad items itself, naming them)."""
    try:
        if ref.path is not None:
            with Image.open(ref.path) as handle:  # lazy: reads the header only
                return min(handle.size)
        return min(ref.opener().size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def median_shorter_side(refs: Sequence[ImageRef], sample: int = 200) -> int | None:
    """Median shorter side of the first `sample` readable images (None if none is)."""
    sides = sorted(side for ref in refs[:sample] if (side := shorter_side(ref)) is not None)
    return sides[(len(sides) - 1) // 2] if sides else None


def load_image_uint8(ref: ImageRef, item: str) -> torch.Tensor:
    """The image as a uint8 tensor of shape (3, H, W), oriented and in RGB."""
    return _channels_first(to_rgb(open_pil(ref, item)))


def load_image(ref: ImageRef, item: str) -> DecodedImage:
    """The image as models see it, plus its stored colour and alpha if it has transparency."""
    image = open_pil(ref, item)
    rgb = _channels_first(to_rgb(image))
    if not has_transparency(image):
        return DecodedImage(rgb, rgb)
    rgba = _channels_first(image.convert("RGBA"))
    return DecodedImage(rgb, rgba[:3].contiguous(), rgba[3:].contiguous())


def _channels_first(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_float(image_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [0, 1]."""
    return image_u8.to(torch.float32) / 255.0


class FloatImages(Sequence[torch.Tensor]):
    """A list of 8-bit images that hands each one out as float32 in [0, 1].

    Kept as uint8, a 512-px image takes 0.8 MB instead of 3 MB: an efficacy-lab row
    holds the clean, uniform-noise and protected copies of its training set at once,
    and 1,500 real-size images as float filled 24 GB. A slice is a FloatImages too.
    """

    def __init__(self, stored: list[torch.Tensor]):
        self.stored = stored

    def __len__(self) -> int:
        return len(self.stored)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> FloatImages: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return FloatImages(self.stored[index])
        return to_float(self.stored[index])


def write_png_temporary(image_u8: torch.Tensor, folder: Path) -> Path:
    """Write a (3 or 4, H, W) uint8 tensor as a fsynced RGB or RGBA PNG, temporarily named.

    The caller renames it into place (`os.replace`), so a crash leaves at most
    a stray ``.tmp-*`` file, never a half image under the final name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    array = image_u8.permute(1, 2, 0).contiguous().numpy()
    handle, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(handle, "wb") as tmp:
            Image.fromarray(array, mode=_PNG_MODES[image_u8.shape[0]]).save(tmp, format="PNG")
            tmp.flush()
            os.fsync(tmp.fileno())
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def save_png_atomic(image_u8: torch.Tensor, path: Path) -> None:
    """Write a (3 or 4, H, W) uint8 tensor as PNG so the file is either whole or absent."""
    os.replace(write_png_temporary(image_u8, path.parent), path)


def read_png_uint8(path: Path) -> torch.Tensor:
    """Read back a PNG written by `save_png_atomic`: (4, H, W) RGBA uint8 for a file
    with transparency, (3, H, W) RGB otherwise."""
    with Image.open(path) as handle:
        return _channels_first(handle.convert("RGBA" if has_transparency(handle) else "RGB"))
