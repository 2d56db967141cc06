"""UAP: error-maximising (adversarial) noise on a clean-trained surrogate (Fowl et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmguard.protect.base import ProtectionItem, option
from mmguard.protect.engine import BilevelMethod, SurrogateConfig, clean_epochs_option
from mmguard.protect.surrogates import TextItem


@dataclass
class UAPConfig(SurrogateConfig):
    clean_epochs: int = clean_epochs_option(10)
    surrogate_pretrained: str | None = option(None, "Pretrained weights for a contrastive "
                                              "surrogate (open_clip tag or checkpoint path).",
                                              type=str)


class ErrorMaximizing(BilevelMethod):
    """max over delta of L(x + delta, text) on a surrogate trained on clean data.

    The surrogate first trains `clean_epochs` epochs on the clean data; then
    one pass over the data, in order, gives each batch `pgd_steps` PGD *ascent*
    steps with the true texts (one round of `protect/engine.py`, no surrogate
    steps). MEM (Liu et al. 2024, Table 1) finds this barely protects
    image-caption data; it is here as the paper's baseline.

    Config (UAPConfig): eps (8/255), step_size (1/255), pgd_steps (8),
    clean_epochs (10), batch_size (16), surrogates (rn-tiny for pairs),
    surrogate_lr (1e-4), surrogate_pretrained (none).

    Example:
        mmguard protect --dataset emoji --method uap --out out/
    """

    name = "uap"
    summary = "error-maximising noise on a clean-trained surrogate"
    Config = UAPConfig
    config: UAPConfig
    maximize = True
    shuffle_rounds = False

    def surrogate_options(self) -> dict[str, Any]:
        options = super().surrogate_options()
        if self.config.surrogate_pretrained:
            options["pretrained"] = self.config.surrogate_pretrained
        if self.family == "lvlm":
            options["trainable"] = True
        return options

    @property
    def pretrain_epochs(self) -> int:
        return self.config.clean_epochs

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        return [self.text_item(item, 0) for item in items]
