"""The learning-rate schedule every attacker uses: linear warmup, then cosine decay to zero.

Both MEM's CLIP recipe and LLaVA's fine-tuning recipe use it. The scheduler is
stepped once per optimiser step (the reference code never stepped it, so its
attackers trained at the peak rate throughout).
"""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int,
                  warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `total` steps whose first `warmup` steps ramp up linearly."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total, warmup))
