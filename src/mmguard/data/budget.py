"""The perturbation budget: parsing it, and keeping it on the saved 8-bit file.

A method optimises in float pixel space; what is released is an 8-bit image.
Rounding could push a pixel one level past the budget (with eps = 0.03,
255 * eps = 7.65, and a change of 7.7 levels rounds to 8). So the quantised
change is clipped to the largest whole number of levels inside the budget,
measured against the original's own 8-bit values.

An image with transparency is protected as models see it (composited on
white) and released as stored: the method's change goes onto the stored
colour values, within the budget measured on them, and the alpha channel is
written back untouched.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from mmguard.data.images import DecodedImage
from mmguard.errors import MMGuardError


def parse_eps(text: str | float) -> float:
    """'8/255' or '0.0314' -> float in (0, 1]; anything else is an error."""
    raw = str(text).strip()
    try:
        value = float(Fraction(raw)) if "/" in raw else float(raw)
    except (ValueError, ZeroDivisionError):
        raise MMGuardError(f"budget {raw!r} is not a number; "
                           "write it like 8/255 or 0.0314") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise MMGuardError(f"budget {raw!r} = {value:g} is outside (0, 1]; pixel values are "
                           "in [0, 1], so 8/255 is the usual choice")
    return value


def levels(eps: float) -> int:
    """The largest whole number of 8-bit levels k with k/255 <= eps."""
    # The small tolerance keeps 8/255 (stored as a float) at 8 levels, not 7.
    return math.floor(eps * 255.0 + 1e-6)


def as_levels(value: float) -> str | None:
    """"8/255" for a value in (0, 1) that is a whole number of 8-bit levels, else None:
    budgets and step sizes read best that way."""
    scaled = value * 255
    if 0 < value < 1 and abs(scaled - round(scaled)) < 1e-6:
        return f"{round(scaled)}/255"
    return None


def project_to_ball(perturbed: torch.Tensor, original: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto {x : |x - original|_inf <= eps} intersected with [0, 1].

    The one L-infinity projection of the package: PGD projects its deltas as
    `project_to_ball(original + delta, original, eps) - original`. Float
    rounding is monotonic, so clipping the sum equals adding the clipped delta
    bit for bit, and released files do not depend on which form a method uses.
    """
    return torch.minimum(torch.maximum(perturbed, original - eps), original + eps).clamp(0.0, 1.0)


def quantize_within_budget(original_u8: torch.Tensor, perturbed: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """Round a float image in [0, 1] to uint8 with |result - original_u8| <= levels(eps)."""
    k = levels(eps)
    if k < 1:
        raise MMGuardError(f"budget {eps:g} is below one 8-bit level (1/255); the saved image "
                           "could not change at all")
    base = original_u8.to(torch.int16)
    rounded = torch.round(perturbed.detach().to(torch.float64) * 255.0).to(torch.int16)
    clipped = torch.clamp(rounded, min=base - k, max=base + k).clamp(0, 255)
    return clipped.to(torch.uint8)


def quantize_release(original: DecodedImage, protected: torch.Tensor, eps: float) -> torch.Tensor:
    """The uint8 image to release, shaped like `original.stored`.

    `protected` is the method's output for `original.rgb`, a float image in [0, 1].
    """
    if original.alpha is None:
        return quantize_within_budget(original.rgb, protected, eps)
    change = protected.detach().to(torch.float64) - original.rgb.to(torch.float64) / 255.0
    colour = quantize_within_budget(original.colour,
                                    original.colour.to(torch.float64) / 255.0 + change, eps)
    return torch.cat([colour, original.alpha])
