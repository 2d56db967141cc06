"""EM: error-minimising noise (Huang et al., ICLR 2021), extended to image-caption pairs."""

from __future__ import annotations

from mmguard.protect.error_minimizing import ContrastiveErrorMinimizing


class ErrorMinimizing(ContrastiveErrorMinimizing):
    """min over delta of min over theta of InfoNCE(x + delta, caption), no text trigger.

    Bilevel: each round trains the surrogate on the protected pairs, then takes
    PGD steps that lower the loss w.r.t. the noise; stops when the mean loss is
    under `stop_loss` (0.01) or after `rounds` (10). MEM (Liu et al. 2024)
    reports that EM alone protects image-caption data only partly.

    Settings: eps (8/255), step_size (1/255), pgd_steps (8), train_steps (1),
    rounds (10), stop_loss (0.01), batch_size, surrogates (["rn-tiny"]),
    surrogate_lr (1e-4, AdamW, weight decay 0.2).

    Example:
        mmguard protect --dataset emoji --method em --surrogate rn-tiny --out out/
    """

    name = "em"
    summary = "error-minimising noise (bilevel, surrogate trained along the way)"
