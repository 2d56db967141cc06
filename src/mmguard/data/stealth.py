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


# SSIM as in Wang et al. (2004): an 11-tap Gaussian window (sigma 1.5), constants
# K1 = 0.01, K2 = 0.03 at a data range of 255, averaged over channels and over the
# positions where the whole window fits (scikit-image's `structural_similarity`
# with gaussian_weights=True, use_sample_covariance=False gives the same numbers).
SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def _gaussian_valid(images: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (C, H, W) float64, only where the window fits."""
    radius = SSIM_WINDOW // 2
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2
                     / (2 * _SSIM_SIGMA**2))
    taps = (taps / taps.sum()).tolist()
    height, width = images.shape[-2:]
    # Weighted sums of shifted views: about 3x faster on CPU than a single-channel
    # float64 conv2d, which matters when auditing thousands of 512-px files.
    rows = sum(w * images[..., :, i:width - SSIM_WINDOW + 1 + i] for i, w in enumerate(taps))
    return sum(w * rows[..., i:height - SSIM_WINDOW + 1 + i, :] for i, w in enumerate(taps))


def ssim(original_u8: torch.Tensor, protected_u8: torch.Tensor) -> float | None:
    """Mean structural similarity of two (C, H, W) 8-bit images; None below 11×11 pixels."""
    if original_u8.shape != protected_u8.shape:
        raise ValueError(f"SSIM needs images of one size; got {tuple(original_u8.shape)} and "
                         f"{tuple(protected_u8.shape)}")
    if min(original_u8.shape[-2:]) < SSIM_WINDOW:
        return None
    x, y = original_u8.to(torch.float64), protected_u8.to(torch.float64)
    mean_x, mean_y = _gaussian_valid(x), _gaussian_valid(y)
    var_x = _gaussian_valid(x * x) - mean_x**2
    var_y = _gaussian_valid(y * y) - mean_y**2
    cov = _gaussian_valid(x * y) - mean_x * mean_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)
             / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)))
    return float(index.mean().item())
