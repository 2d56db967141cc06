"""MEM: multi-step error minimisation, noise + text trigger (Liu et al., ACM MM 2024)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmguard.protect.base import ProtectionItem, option
from mmguard.protect.engine import TriggerConfig, half_of
from mmguard.protect.methods.em import EMConfig, ErrorMinimizing
from mmguard.protect.seeding import item_generator
from mmguard.protect.surrogates import TextItem


@dataclass
class MEMConfig(EMConfig, TriggerConfig):
    """EM's options, the trigger's, and where MEM's reference code differs from the paper."""

    shuffle_every: str = option("batch", "Shuffle the captions PGD scores each image with "
                                "once per batch, or at every PGD step (the reference code).",
                                choices=("batch", "step"))
    trigger_init: str = option("the", "Start every trigger as 'the the the', or as random "
                               "allowed tokens (the reference code).", choices=("the", "random"))
    noise_per: str = option("image", "One noise and trigger per image, shared by its caption "
                            "rows; or per caption row, the image released once per row as "
                            "<stem>__c<k>.png (the reference code on Flickr's five captions).",
                            choices=("image", "caption"))


class MultiStepErrorMinimizing(ErrorMinimizing):
    """min over (delta, trigger) of min over theta of L(x + delta, trigger + caption).

    Each image gets its own noise and its own k-token trigger, placed before
    every caption of that image. Per round and batch (see `protect/engine.py`):
    surrogate steps; a HotFlip trigger update (top-k candidates from the
    embedding gradient, exact batch loss, left-to-right beam search; only in
    the first `trigger_rounds`, default half of the rounds); PGD descent with
    the captions shuffled within the batch and each image's own trigger
    attached, so the noise binds to the trigger rather than to the caption's
    meaning. Triggers start as "the the the"; `natural_triggers` restricts
    them to real English words (MEM section 4.4).

    Config (MEMConfig): EM's options plus trigger_len (3; MEM-3 / MEM-5),
    top_k (16), beam_width (1), trigger_rounds (half of the rounds),
    natural_triggers (False), trigger_vocab (whole vocabulary), shuffle_every
    ("batch"), trigger_init ("the"), noise_per ("image").

    The authors' reference code (src/poison_train.py) differs from the paper;
    its regime is `--round-train-steps 200 --train-steps 0 --surrogate-lr 1e-4
    --shuffle-every step --trigger-init random --trigger-rounds R/4`, and it
    protects every caption row on its own (`--noise-per caption`): an image
    with five captions is released five times, each copy with its own noise
    and trigger.

    Example:
        mmguard protect --dataset emoji --method mem --trigger-len 5 --out out/
    """

    name = "mem"
    summary = "MEM: noise + optimised text trigger (CLIP-style models)"
    Config = MEMConfig
    config: MEMConfig

    @property
    def trigger_len(self) -> int:
        return self.config.trigger_len

    @property
    def release_per(self) -> str:
        return self.config.noise_per

    @property
    def trigger_rounds(self) -> int:
        rounds = self.config.trigger_rounds
        return half_of(self.rounds) if rounds is None else rounds

    def initial_trigger(self, key: str) -> list[int]:
        if self.config.trigger_init == "the":
            return super().initial_trigger(key)
        generator = item_generator(self.config.seed, f"trigger {key}")
        picks = torch.randint(len(self.allowed), (self.trigger_len,), generator=generator)
        return self.allowed[picks].tolist()

    def noise_loss(self, items: list[ProtectionItem], texts: list[TextItem], reference: Any,
                   generator: torch.Generator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        if self.config.shuffle_every == "batch":
            return super().noise_loss(items, texts, reference, generator)

        def reshuffled(images: list[torch.Tensor]) -> torch.Tensor:
            return self.surrogate.noise_loss(self.noise_texts(texts, generator),
                                             reference)(images)

        return reshuffled

    def noise_texts(self, texts: list[TextItem], generator: torch.Generator) -> list[TextItem]:
        """Captions shuffled within the batch, each image keeping its own trigger."""
        shuffled = torch.randperm(len(texts), generator=generator).tolist()
        return [TextItem(texts[j].text, texts[j].response, own.trigger, own.position)
                for own, j in zip(texts, shuffled, strict=True)]
