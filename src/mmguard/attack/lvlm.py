"""The attacker for instruction triples: fine-tune an LVLM on (image, prompt, response).

The recipes follow LLaVA-1.5's (Liu et al. 2023): AdamW, no weight decay, 3%
linear warmup then cosine decay, gradient norm clipped at 1, and the loss is
next-token cross-entropy on the response tokens only (the adapter's
`forward`). Recipes, each with its own default learning rate:

- lora (2e-4): LoRA (peft) on the language model's projections named by
  `adapter.lora_target_modules()`, *and* the projector trained in full, as
  LLaVA's LoRA script does (`mm_projector_lr`); the language model's own
  weights and the vision tower stay frozen;
- projector (1e-3): only the modality connector (LLaVA's stage 1);
- full (2e-5): what `adapter.trainable_parameters("full")` names (for the
  embedded models: projector and language model; the vision tower stays
  frozen, as in LLaVA).

Each epoch, every stored-resolution training image goes through the
attacker's augmentation (if any, see `augment.py`) and then the adapter's own
image processor, batch by batch. Everything random (LoRA initialisation,
dropout, example order, augmentation) follows from `seed`.

Example:
    adapter = create_lvlm("lvlm-test")
    log = fine_tune_lvlm(adapter, load_triples(dataset), LVLMRecipe(recipe="lora", epochs=2))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mmguard.attack.augment import AugmentPipeline
from mmguard.attack.schedule import warmup_cosine
from mmguard.attack.triples import TripleSet
from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import LVLMAdapter
from mmguard.models.lvlm.registry import create_lvlm

LVLM_RECIPES = ("lora", "projector", "full")
DEFAULT_LR = {"lora": 2e-4, "projector": 1e-3, "full": 2e-5}


@dataclass
class LVLMRecipe:
    model: str = "smolvlm-lite"
    recipe: str = "lora"
    epochs: int = 3
    lr: float | None = None  # None: DEFAULT_LR of the recipe
    batch_size: int = 8
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    weight_decay: float = 0.0
    warmup_fraction: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    augment: AugmentPipeline | None = None

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.recipe] if self.lr is None else self.lr


@dataclass
class TrainingLog:
    step_losses: list[float] = field(default_factory=list)  # mean response loss per batch
    learning_rates: list[float] = field(default_factory=list)  # the rate each step used
    epoch_losses: list[float] = field(default_factory=list)  # mean of the epoch's batches
    trainable: int = 0  # number of trained parameter values


def build_attacker(recipe: LVLMRecipe) -> LVLMAdapter:
    """The attacker's untouched starting checkpoint (the same for every seed)."""
    return create_lvlm(recipe.model, recipe.device)


def prepare_for_training(adapter: LVLMAdapter, recipe: LVLMRecipe) -> list[nn.Parameter]:
    """Freeze everything, add LoRA if the recipe asks, unfreeze what it trains; return that."""
    if recipe.recipe not in LVLM_RECIPES:
        raise MMGuardError(f"unknown LVLM recipe {recipe.recipe!r}; choose one of "
                           f"{', '.join(LVLM_RECIPES)}")
    torch.manual_seed(recipe.seed)
    adapter.model.requires_grad_(False)
    if recipe.recipe == "lora":
        trainable = add_lora(adapter, recipe) + _projector(adapter)
    else:
        trainable = adapter.trainable_parameters(recipe.recipe)
    for parameter in trainable:
        parameter.requires_grad_(True)
    if not trainable:
        raise MMGuardError(f"{adapter.name}: the {recipe.recipe} recipe trains no parameters")
    return trainable


def _projector(adapter: LVLMAdapter) -> list[nn.Parameter]:
    try:
        return adapter.trainable_parameters("projector")
    except MMGuardError:
        raise MMGuardError(f"{adapter.name}: the lora recipe also trains the projector, which "
                           "this adapter does not expose") from None


def add_lora(adapter: LVLMAdapter, recipe: LVLMRecipe) -> list[nn.Parameter]:
    """Inject LoRA into the adapter's model in place (works on any nn.Module); its weights."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
                        lora_dropout=recipe.lora_dropout,
                        target_modules=adapter.lora_target_modules())
    try:
        inject_adapter_in_model(config, adapter.model)
    except ValueError as exc:
        raise MMGuardError(f"{adapter.name}: cannot add LoRA to "
                           f"{adapter.lora_target_modules()}: {exc}") from None
    return [p for name, p in adapter.model.named_parameters() if ".lora_" in name]


def fine_tune_lvlm(adapter: LVLMAdapter, train: TripleSet, recipe: LVLMRecipe,
                   progress=None) -> TrainingLog:
    """Fine-tune `adapter` in place on `train`; leaves it in eval mode.

    `progress(epoch, mean_loss)` is called after every epoch.
    """
    examples = train.examples()
    if not examples:
        raise MMGuardError("the training set has no examples")
    parameters = prepare_for_training(adapter, recipe)
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate,
                                  weight_decay=recipe.weight_decay)
    total = math.ceil(len(examples) / recipe.batch_size) * recipe.epochs
    scheduler = warmup_cosine(optimizer, total, int(total * recipe.warmup_fraction))
    order_generator = torch.Generator().manual_seed(recipe.seed)
    augment_generator = torch.Generator().manual_seed(recipe.seed + 1)
    log = TrainingLog(trainable=sum(p.numel() for p in parameters))
    try:
        for epoch in range(recipe.epochs):
            adapter.model.train()
            images = train.images if recipe.augment is None else [
                recipe.augment(image, augment_generator) for image in train.images]
            order = torch.randperm(len(examples), generator=order_generator).tolist()
            first_step = len(log.step_losses)
            for start in range(0, len(order), recipe.batch_size):
                batch = [examples[i] for i in order[start:start + recipe.batch_size]]
                pixels = adapter.pixel_inputs([images[index] for index, _ in batch])
                encoded = adapter.encode([example for _, example in batch], pixels)
                loss = adapter.forward(encoded, pixels).loss.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, recipe.max_grad_norm)
                log.learning_rates.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                log.step_losses.append(loss.item())
            epoch_steps = log.step_losses[first_step:]
            log.epoch_losses.append(sum(epoch_steps) / len(epoch_steps))
            if progress is not None:
                progress(epoch + 1, log.epoch_losses[-1])
    finally:
        adapter.model.eval()
        adapter.model.requires_grad_(False)
    return log
