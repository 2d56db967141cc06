"""EM: error-minimising noise (Huang et al., ICLR 2021), extended to image-text data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmguard.protect.base import option
from mmguard.protect.engine import BilevelConfig, BilevelMethod


@dataclass
class EMConfig(BilevelConfig):
    stop_loss: float = option(0.01, "Stop when the mean training loss on protected data is "
                              "below this.")
    surrogate_pretrained: str | None = option(None, "Pretrained weights for a contrastive "
                                              "surrogate (open_clip tag or checkpoint path).",
                                              type=str)
    round_train_steps: int = option(0, "Surrogate steps on protected batches at the start of "
                                    "each round, the surrogate then fixed for the round (the MEM "
                                    "reference code: 200 at lr 1e-4, with --train-steps 0).",
                                    min=0)


class ErrorMinimizing(BilevelMethod):
    """min over delta of min over theta of L(x + delta, text), no text trigger.

    Bilevel (see `protect/engine.py`): each round trains the surrogate on the
    protected data (`train_steps` per batch), then takes `pgd_steps` PGD steps
    that lower the loss w.r.t. the noise; stops when the mean loss is under
    `stop_loss` or after `rounds`. With a contrastive surrogate L is InfoNCE
    over the batch; with an LVLM surrogate, the response loss. MEM (Liu et al.
    2024) reports that EM alone protects image-caption data only partly.

    Config (EMConfig): eps (8/255), step_size (1/255), pgd_steps (8),
    train_steps (1), round_train_steps (0), rounds (10), stop_loss (0.01), batch_size (16),
    surrogates (rn-tiny for pairs, smolvlm-lite for triples), surrogate_lr
    (1e-4; AdamW, weight decay 0.2 for contrastive surrogates), surrogate_bn
    ("running"), surrogate_pretrained (none).

    Example:
        mmguard protect --dataset emoji --method em --surrogate rn-tiny --out out/
    """

    name = "em"
    summary = "error-minimising noise (bilevel, surrogate trained along the way)"
    Config = EMConfig
    config: EMConfig

    def surrogate_options(self) -> dict[str, Any]:
        options = super().surrogate_options()
        if self.config.surrogate_pretrained:
            options["pretrained"] = self.config.surrogate_pretrained
        if self.family == "lvlm":
            options["trainable"] = self.config.train_steps > 0
        return options

    @property
    def round_surrogate_steps(self) -> int:
        return self.config.round_train_steps

    @property
    def stop_loss(self) -> float | None:
        return self.config.stop_loss
