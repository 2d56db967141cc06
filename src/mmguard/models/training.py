"""The one training loop for attackers, surrogates and alignment.

Two pieces, usable apart:

- `Trainer`: AdamW on some parameters, optionally with a linear-warmup then
  cosine-decay schedule and gradient-norm clipping; `trainer.step(loss)` is
  one optimisation step on one batch's loss.
- `train_epochs`: the epoch loop around it: each epoch puts the model in
  training mode (its frozen parts in inference mode), runs an optional hook
  (e.g. re-augment the images), orders the items from a seeded source, asks
  `batch_loss(indices)` for each batch's loss and steps on it, and logs step
  and epoch losses.

Example:
    trainer = Trainer(parameters, lr=5e-4, weight_decay=0.2,
                      total_steps=steps_per_run(len(data), 64, 30), warmup_fraction=0.1)
    log = train_epochs(trainer, model, lambda batch: loss_of(batch), items=len(data),
                       batch_size=64, epochs=30, shuffle=random.Random(seed))

The schedule is stepped once per optimiser step (MEM's and LLaVA's recipes
both use it; the reference code never stepped it, so its attackers trained at
the peak rate throughout).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


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


def steps_per_run(items: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of `epochs` epochs over `items` in batches (the last may be short)."""
    return math.ceil(items / batch_size) * epochs


class Trainer:
    """AdamW with an optional warmup-cosine schedule: one optimisation step per batch.

    Arguments:
        parameters: what is trained (others should have requires_grad off).
        lr: peak learning rate; weight_decay: AdamW's decoupled decay.
        total_steps: length of the warmup-cosine schedule; None keeps `lr` constant.
        warmup_steps: first steps of the schedule that ramp up linearly.
        max_grad_norm: clip the gradient norm to this before each step (0: no clipping).
    """

    def __init__(self, parameters: Iterable[nn.Parameter], lr: float,
                 weight_decay: float = 0.0, total_steps: int | None = None,
                 warmup_steps: int = 0, max_grad_norm: float = 0.0):
        self.parameters = list(parameters)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.scheduler = (None if total_steps is None
                          else warmup_cosine(self.optimizer, total_steps, warmup_steps))
        self.max_grad_norm = max_grad_norm

    @property
    def learning_rate(self) -> float:
        """The rate the next step will use."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def trainable(self) -> int:
        """Number of trained parameter values."""
        return sum(p.numel() for p in self.parameters)

    def step(self, loss: torch.Tensor) -> float:
        """Backpropagate `loss` (fresh gradients), clip, update, advance the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.item()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


@dataclass
class TrainingLog:
    step_losses: list[float] = field(default_factory=list)  # loss of every step's batch
    learning_rates: list[float] = field(default_factory=list)  # the rate each step used
    epoch_losses: list[float] = field(default_factory=list)  # mean of the epoch's steps
    trainable: int = 0  # number of trained parameter values


# Each epoch's order comes from a seeded source. Both kinds are kept because the
# contrastive attacker was built on Python's RNG and the LVLM one on torch's, and
# switching either would change every number measured with it.
Shuffle = random.Random | torch.Generator


def epoch_order(shuffle: Shuffle, items: int) -> list[int]:
    """A permutation of range(items) drawn from `shuffle`."""
    if isinstance(shuffle, random.Random):
        order = list(range(items))
        shuffle.shuffle(order)
        return order
    return torch.randperm(items, generator=shuffle).tolist()


def freeze_untrained(model: nn.Module, trained: Iterable[nn.Parameter]) -> None:
    """Put every submodule that has parameters, none of them trained, in inference mode.

    A frozen tower is a fixed feature extractor, as in linear probing: its BatchNorm
    keeps the statistics it was trained with and its dropout is off. In training mode
    the BatchNorm layers of a "frozen" tower would normalise with each batch's
    statistics and re-estimate their running ones on the attacker's data, which moved
    the frozen-LiT attacker's clean test score (i2t MedR 45 in inference mode, 68 in
    training mode on emoji-scenes). Parameter-free modules (a LoRA layer's dropout)
    follow their parent.
    """
    trained_ids = {id(p) for p in trained}
    for module in model.modules():
        parameters = list(module.parameters())
        if parameters and not any(id(p) in trained_ids for p in parameters):
            module.eval()


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of `model`, of any dimension."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batchnorm_statistics_of(model: nn.Module, feed: Callable[[], None]) -> Iterator[None]:
    """Inside, `model` is in inference mode with every BatchNorm layer normalising by the
    statistics of the inputs `feed()` runs through the model (an exact average over its
    batches: AdaBN, Li et al. 2016); on exit the running statistics it had come back.

    An attacker who trained on noisy images re-estimates the statistics on clean images
    (the test queries themselves, no labels needed) to undo what the noise did to them:
    that alone removed uniform noise's whole effect on the fine-tuned LiT (findings §22).
    The other layers stay in inference mode while `feed` runs, so dropout and stochastic
    depth do not enter the statistics.
    """
    norms = [m for m in batchnorm_layers(model) if m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
              m.momentum) for m in norms]
    was_training = model.training
    model.eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average, not an exponential one
            norm.train()
        with torch.no_grad():
            feed()
        for norm in norms:
            norm.eval()
        yield
    finally:
        for norm, (mean, var, count, momentum) in zip(norms, saved, strict=True):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.num_batches_tracked.copy_(count)
            norm.momentum = momentum
        model.train(was_training)


def train_epochs(trainer: Trainer, model: nn.Module,
                 batch_loss: Callable[[Sequence[int]], torch.Tensor | None], *, items: int,
                 batch_size: int, epochs: int, shuffle: Shuffle,
                 before_epoch: Callable[[int], None] | None = None,
                 progress: Callable[[int, float], None] | None = None) -> TrainingLog:
    """Train for `epochs` passes over `items` items; returns the loss log.

    `batch_loss(indices)` gives the loss of the batch of those items, or None to
    skip it (no step). `before_epoch(epoch)` runs after the model is put in
    training mode and before the epoch's order is drawn; `progress(epoch,
    mean_loss)` after every epoch (1-based).
    """
    log = TrainingLog(trainable=trainer.trainable)
    for epoch in range(epochs):
        model.train()
        freeze_untrained(model, trainer.parameters)
        if before_epoch is not None:
            before_epoch(epoch)
        order = epoch_order(shuffle, items)
        first_step = len(log.step_losses)
        for start in range(0, items, batch_size):
            loss = batch_loss(order[start:start + batch_size])
            if loss is None:
                continue
            log.learning_rates.append(trainer.learning_rate)
            log.step_losses.append(trainer.step(loss))
        epoch_steps = log.step_losses[first_step:]
        log.epoch_losses.append(sum(epoch_steps) / max(1, len(epoch_steps)))
        if progress is not None:
            progress(epoch + 1, log.epoch_losses[-1])
    return log
