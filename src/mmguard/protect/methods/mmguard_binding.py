"""MMGuard: coupled image noise + inserted text trigger against LVLM fine-tuning.

Zhao et al. 2026, "To See is Not to Learn". For (image, prompt, response)
data, on one surrogate LVLM or an ensemble (`protect/surrogates/lvlm.py`),
per round and batch of the engine (`protect/engine.py`):

1. (with `bilevel`) the surrogates' projectors take `train_steps` steps on the
   current protected batch;
2. the trigger (`trigger_len` tokens, *inserted* into the prompt at
   `trigger_position`, never replacing a word) is updated by HotFlip: top-k
   candidates per trigger position from the embedding gradient, then every
   candidate is decoded, inserted as text, re-tokenised, rejected unless it
   tokenises back to the same ids, and scored by the exact loss; the current
   trigger is always a candidate, so no item's loss rises;
3. the image noise takes PGD steps through each surrogate's differentiable
   image processor.

By default the steps follow the paper's -Max (`objective max`, Eq 32): they
raise the response-only training loss while lowering `binding_weight` times the
binding disruption loss (`binding`: bph-exact, Eq 27 on the first
`binding_layers` layers; crs-kl, Eq 29; the simplified bph and crs; or none), on
the surrogate after `inner_steps` LoRA steps on the protected batch (the
paper's Q), which are discarded after every round. `objective min` lowers the
training loss instead (error-minimising), so the noise and trigger become a
shortcut. `components` image / text are the paper's single-modality ablations;
`binding none` the one without binding disruption. What each of these did on
our data: docs/findings-lvlm.md, "Fidelity: the summary of the rows".
Beyond the paper, `trigger_groups response` and `noise_groups response` share
one trigger, or one noise pattern, among all items with the same responses.

Config (MMGuardConfig): eps (8/255), trigger_len (5), trigger_position
("end"), binding ("bph-exact"), binding_layers (2), perturbation_share (0.25),
binding_weight (2.0), objective ("max"), inner_steps (1), components ("image+text"),
rounds (3), trigger_rounds (all), pgd_steps (8), step_size (1/255), top_k (8),
beam_width (1), batch_size (8), surrogates (["smolvlm-lite"]), bilevel (off),
train_steps (1), surrogate_lr (1e-4), trigger_groups / noise_groups ("item"),
natural_triggers (off), trigger_vocab (all whole-word tokens).

Example:
    mmguard protect --dataset fashion-mnist --kind triples --method mmguard \\
        --surrogate smolvlm-lite --surrogate smolvlm-lite-b --out protected/
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from mmguard.errors import MMGuardError
from mmguard.protect.base import MethodConfig, ProtectionItem, option
from mmguard.protect.engine import BilevelConfig, BilevelMethod, TriggerConfig
from mmguard.protect.grouping import answer_of
from mmguard.protect.pgd import random_start
from mmguard.protect.seeding import item_generator
from mmguard.protect.surrogates import TextItem
from mmguard.protect.surrogates.lvlm import BINDINGS, OBJECTIVES

GROUPS = ("item", "response")  # trigger_groups / noise_groups


@dataclass
class MMGuardConfig(BilevelConfig, TriggerConfig):
    batch_size: int = option(8, "Images per optimisation batch.", min=2)
    rounds: int = option(3, "Outer rounds of bilevel optimisation.", min=1)
    top_k: int = option(8, "HotFlip candidates per trigger position.", min=1)
    # The defaults are the paper's method (its Eq 27, -Max, Q = 1, 5-token triggers) with
    # the weight its own sweep found best (2.0), as benchmarks/fidelity.py measured it;
    # the simplified losses (bph, crs) are kept by name for the earlier benchmark.
    trigger_len: int = option(5, "Text trigger length in tokens (the paper's 5).", min=1, max=32)
    binding: str = option("bph-exact", "Cross-modal binding disruption: Bridge Path Hijack or "
                          "Contrastive Routing Shift, simplified (bph, crs: all layers' mean "
                          "attention) or as the paper defines them (bph-exact: Eq 27, crs-kl: "
                          "Eq 29, on the first --binding-layers layers), or none.",
                          choices=BINDINGS)
    binding_weight: float = option(2.0, "Weight of the binding loss.", min=0.0)
    binding_layers: int = option(2, "bph-exact / crs-kl: the first N attention layers the "
                                 "binding loss reads (the paper prefers 1-2).", min=1)
    perturbation_share: float = option(0.25, "bph-exact: share of the image tokens, those "
                                       "whose pixels change most, that form the perturbation "
                                       "tokens (the paper's tau_delta, which it does not state; "
                                       "not swept here).",
                                       min=0.0, max=1.0)
    inner_steps: int = option(1, "Inner adaptation: LoRA steps (rank 8, attention and MLP "
                              "projections, batch 2) on the protected batch before each outer "
                              "update, discarded after every round (the paper's Q; 0 turns it "
                              "off).", min=0)
    inner_lr: float = option(1e-4, "Learning rate of the inner LoRA steps.", min=0.0)
    objective: str = option("max", "min: minimise the training loss (error-minimising); max: "
                            "maximise it while minimising the binding loss (the paper's -Max).",
                            choices=OBJECTIVES)
    components: str = option("image+text", "Perturb the image, insert a trigger, or both.",
                             choices=("image+text", "image", "text"))
    trigger_position: str = option("end", "Where the trigger goes in the prompt: start, end or "
                                   "a word index.")
    trigger_groups: str = option("item", "One trigger per item (the paper), or one shared by "
                                 "all items whose responses are the same.", choices=GROUPS)
    noise_groups: str = option("item", "One noise pattern per image (the paper), or one shared "
                               "by all images whose responses are the same (images of one "
                               "size).", choices=GROUPS)
    bilevel: bool = option(False, "Train the surrogates' projectors on the protected data "
                           "between perturbation updates.", flag=True)


class MMGuard(BilevelMethod):
    name = "mmguard"
    summary = "MMGuard: noise + inserted trigger + binding disruption (LLaVA-style LVLMs)"
    Config = MMGuardConfig
    config: MMGuardConfig
    kinds = ("triples",)

    def __init__(self, config: MethodConfig | None = None, kind: str | None = None):
        super().__init__(config, kind)
        config = self.config
        for name, value, choices in (("components", config.components,
                                      ("image+text", "image", "text")),
                                     ("trigger-groups", config.trigger_groups, GROUPS),
                                     ("noise-groups", config.noise_groups, GROUPS)):
            if value not in choices:
                raise MMGuardError(f"--{name} {value!r}: choose {', '.join(choices)}")
        self._position = _trigger_position(config.trigger_position)

    @property
    def trigger_position(self) -> str | int:
        return self._position

    def surrogate_options(self) -> dict[str, Any]:
        config = self.config
        return {**super().surrogate_options(), "trainable": config.bilevel,
                "binding": config.binding, "binding_weight": config.binding_weight,
                "binding_layers": config.binding_layers,
                "perturbation_share": config.perturbation_share, "objective": config.objective,
                "inner_steps": config.inner_steps, "inner_lr": config.inner_lr}

    # -- the engine's hooks ----------------------------------------------------------
    @property
    def trigger_len(self) -> int:
        return 0 if self.config.components == "image" else self.config.trigger_len

    @property
    def trigger_rounds(self) -> int:
        rounds = self.config.trigger_rounds
        return self.rounds if rounds is None else rounds

    @property
    def perturbs_image(self) -> bool:
        return self.config.components != "text"

    @property
    def surrogate_steps(self) -> int:
        return max(1, self.config.train_steps) if self.config.bilevel else 0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "trigger_len": self.trigger_len}

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        """One (prompt, response) per image for this round (a random one if it has several)."""
        texts = []
        for item in items:
            if not item.responses:
                raise MMGuardError(f"{item.key}: mmguard protects (image, prompt, response) "
                                   "triples; this item has no response (use --kind triples)")
            pick = random.Random(f"{self.config.seed} {round_index} {item.key}").randrange(
                len(item.texts))
            texts.append(self.text_item(item, pick))
        return texts

    def noise_key(self, item: ProtectionItem) -> str:
        return _group_key(item, self.config.noise_groups)

    def trigger_key(self, item: ProtectionItem) -> str:
        return _group_key(item, self.config.trigger_groups)

    def initial_noise(self, item: ProtectionItem) -> torch.Tensor:
        """A seeded random start in the ball: a zero start would leave CRS stuck, as a
        divergence from the clean input has zero gradient at the clean input itself."""
        generator = item_generator(self.config.seed, f"start {self.noise_key(item)}")
        return random_start([item.image], self.config.eps, generator)[0]


def _group_key(item: ProtectionItem, grouping: str) -> str:
    """The item itself, or ("response") every item with the same set of responses."""
    if grouping == "item":
        return item.key
    return "response: " + answer_of(item)


def _trigger_position(position: str | int) -> str | int:
    if position in ("start", "end"):
        return position
    try:
        index = int(position)
    except ValueError:
        raise MMGuardError(f"--trigger-position {position!r}: use start, end or a word "
                           "index") from None
    if index < 0:
        raise MMGuardError("--trigger-position must not be negative")
    return index
