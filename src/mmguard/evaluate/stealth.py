"""How visible a perturbation is, measured on 8-bit images."""

from __future__ import annotations

import math

import torch


def linf_levels(original_u8: torch.Tensor, protected_u8: torch.Tensor) -> int:
    """Largest absolute per-pixel change in 8-bit levels (8 means 8/255)."""
    diff = original_u8.to(torch.int16) - protected_u8.to(torch.int16)
    return int(diff.abs().max().item()) if diff.numel() else 0


def psnr_db(original_u8: torch.Tensor, protected_u8: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB (peak 255); inf for identical images."""
    diff = original_u8.to(torch.float64) - protected_u8.to(torch.float64)
    mse = float((diff**2).mean().item())
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)
