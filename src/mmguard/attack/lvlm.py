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

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmguard.attack.augment import AugmentPipeline
from mmguard.attack.triples import TripleSet
from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import LVLMAdapter
from mmguard.models.lvlm.lora import inject_lora
from mmguard.models.lvlm.registry import create_lvlm
from mmguard.models.training import Trainer, TrainingLog, steps_per_run, train_epochs

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
    projector: str | None = None  # aligned projector weights (embedded LVLMs; `mmguard align`)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.recipe] if self.lr is None else self.lr


def build_attacker(recipe: LVLMRecipe) -> LVLMAdapter:
    """The attacker's untouched starting checkpoint (the same for every seed)."""
    projector = Path(recipe.projector) if recipe.projector else None
    return create_lvlm(recipe.model, recipe.device, projector=projector)


def prepare_for_training(adapter: LVLMAdapter, recipe: LVLMRecipe) -> list[nn.Parameter]:
    """Freeze everything, add LoRA if the recipe asks, unfreeze what it trains; return that."""
    if recipe.recipe not in LVLM_RECIPES:
        raise MMGuardError(f"unknown LVLM recipe {recipe.recipe!r}; choose one of "
                           f"{', '.join(LVLM_RECIPES)}")
    torch.manual_seed(recipe.seed)
    adapter.model.requires_grad_(False)
    if recipe.recipe == "lora":
        trainable = inject_lora(adapter, recipe.lora_rank, recipe.lora_alpha,
                                recipe.lora_dropout) + _projector(adapter)
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


def fine_tune_lvlm(adapter: LVLMAdapter, train: TripleSet, recipe: LVLMRecipe,
                   progress=None) -> TrainingLog:
    """Fine-tune `adapter` in place on `train`; leaves it in eval mode.

    `progress(epoch, mean_loss)` is called after every epoch.
    """
    examples = train.examples()
    if not examples:
        raise MMGuardError("the training set has no examples")
    total = steps_per_run(len(examples), recipe.batch_size, recipe.epochs)
    trainer = Trainer(prepare_for_training(adapter, recipe), recipe.learning_rate,
                      recipe.weight_decay, total, int(total * recipe.warmup_fraction),
                      recipe.max_grad_norm)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    augment_generator = torch.Generator().manual_seed(recipe.seed + 1)
    images = train.images

    def augment(epoch: int) -> None:
        nonlocal images
        images = [recipe.augment(image, augment_generator) for image in train.images]

    def batch_loss(indices: list[int]) -> torch.Tensor:
        batch = [examples[i] for i in indices]
        pixels = adapter.pixel_inputs([images[index] for index, _ in batch])
        encoded = adapter.encode([example for _, example in batch], pixels)
        return adapter.forward(encoded, pixels).loss.mean()

    try:
        return train_epochs(trainer, adapter.model, batch_loss, items=len(examples),
                            batch_size=recipe.batch_size, epochs=recipe.epochs,
                            shuffle=order_generator,
                            before_epoch=None if recipe.augment is None else augment,
                            progress=progress)
    finally:
        adapter.model.eval()
        adapter.model.requires_grad_(False)
