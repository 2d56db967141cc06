"""The shared training loop: one optimisation step, the schedule, the epoch loop."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from mmguard.models.training import (
    Trainer,
    batchnorm_statistics_of,
    epoch_order,
    steps_per_run,
    train_epochs,
)


def _regression(seed: int = 0):
    torch.manual_seed(seed)
    inputs, targets = torch.randn(10, 3), torch.randn(10, 1)
    return nn.Linear(3, 1), inputs, targets


def test_epoch_loop_steps_once_per_batch_and_logs_epoch_means():
    model, inputs, targets = _regression()
    trainer = Trainer(model.parameters(), lr=0.1, total_steps=steps_per_run(10, 4, 3),
                      warmup_steps=2)
    seen, hooks = [], []

    def batch_loss(batch):
        seen.append(list(batch))
        if len(batch) < 3:  # the short last batch is skipped: no step, no loss
            return None
        return ((model(inputs[batch]) - targets[batch]) ** 2).mean()

    log = train_epochs(trainer, model, batch_loss, items=10, batch_size=4, epochs=3,
                       shuffle=random.Random(0), before_epoch=hooks.append)
    assert hooks == [0, 1, 2] and len(seen) == 9
    assert all(sorted(sum(seen[3 * e:3 * e + 3], [])) == list(range(10)) for e in range(3))
    assert seen[0] != seen[3]  # a new order every epoch
    assert len(log.step_losses) == 6 and log.trainable == 4
    assert log.epoch_losses[0] == pytest.approx(sum(log.step_losses[:2]) / 2)
    # linear warmup over two steps, then cosine decay over the remaining 7 of 9 scheduled
    decayed = 0.1 * 0.5 * (1 + math.cos(math.pi / 7))
    assert log.learning_rates[:4] == pytest.approx([0.05, 0.1, 0.1, decayed])
    assert log.step_losses[-1] < log.step_losses[0]


def test_a_step_uses_fresh_gradients_and_clips_them():
    model, inputs, targets = _regression()
    trainer = Trainer(model.parameters(), lr=0.0, max_grad_norm=1e-3)
    for _ in range(2):
        trainer.step(((model(inputs) - targets) ** 2).mean() * 100)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-4)  # one step's clipped gradient


def test_epoch_order_is_a_seeded_permutation_from_either_source():
    for make in (random.Random, lambda seed: torch.Generator().manual_seed(seed)):
        first, again = epoch_order(make(3), 20), epoch_order(make(3), 20)
        assert first == again and sorted(first) == list(range(20))
        assert epoch_order(make(4), 20) != first


def test_trainer_state_round_trips():
    model, inputs, targets = _regression()
    trainer = Trainer(model.parameters(), lr=0.1, total_steps=10, warmup_steps=3)
    trainer.step(((model(inputs) - targets) ** 2).mean())
    other = Trainer(model.parameters(), lr=0.1, total_steps=10, warmup_steps=3)
    other.load_state_dict(trainer.state_dict())
    assert other.learning_rate == trainer.learning_rate
    assert other.optimizer.state_dict()["state"][0]["step"] == 1


def test_frozen_parts_train_in_inference_mode():
    """A frozen tower keeps its BatchNorm statistics and drops no units; the trained
    head (and the parameter-free dropout beside it) trains in training mode."""
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    head_dropout = nn.Dropout(0.5)
    model = nn.Sequential(tower, head_dropout, nn.Linear(4, 1))
    tower.requires_grad_(False)
    stats = tower[1].running_mean.clone()
    inputs, targets = torch.randn(8, 3) * 5 + 3, torch.randn(8, 1)
    modes = []

    def batch_loss(batch):
        modes.append((tower.training, tower[2].training, head_dropout.training,
                      model[2].training))
        return ((model(inputs[batch]) - targets[batch]) ** 2).mean()

    trainer = Trainer(model[2].parameters(), lr=0.1)
    train_epochs(trainer, model, batch_loss, items=8, batch_size=4, epochs=2,
                 shuffle=random.Random(0))
    assert set(modes) == {(False, False, True, True)}
    assert torch.equal(tower[1].running_mean, stats)
    # Everything trained: the loop leaves every module in training mode, as before.
    everything = Trainer(model.parameters(), lr=0.1)
    tower.requires_grad_(True)
    modes.clear()
    train_epochs(everything, model, batch_loss, items=8, batch_size=4, epochs=1,
                 shuffle=random.Random(0))
    assert set(modes) == {(True, True, True, True)}
    assert not torch.equal(tower[1].running_mean, stats)


def test_batchnorm_statistics_come_from_the_fed_inputs_and_go_back_on_exit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    norm = model[1]
    norm.running_mean.fill_(7.0)  # as if trained on shifted data
    norm.running_var.fill_(3.0)
    model.train()
    batches = [torch.randn(8, 3, 6, 6) + 2.0 for _ in range(3)]
    with torch.no_grad():
        conv_out = torch.cat([model[0](b) for b in batches])
    with batchnorm_statistics_of(model, lambda: [model(b) for b in batches]):
        # The exact average over the fed batches (equal sizes: the mean of all of them),
        # not an exponential mix with the old 7.0.
        torch.testing.assert_close(norm.running_mean, conv_out.mean(dim=(0, 2, 3)))
        assert not model.training and not model[2].training
        with torch.no_grad():
            first, second = model(batches[0]), model(batches[0])
        torch.testing.assert_close(first, second)  # inference mode: no dropout, no update
    assert model.training
    assert torch.all(norm.running_mean == 7.0) and torch.all(norm.running_var == 3.0)
    assert norm.momentum == 0.1
