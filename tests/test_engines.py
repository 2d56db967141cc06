"""The optimisation engines: PGD on pixels, HotFlip on trigger tokens."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmguard.data.budget import quantize_within_budget
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, to_float
from mmguard.models.contrastive import info_nce
from mmguard.protect.hotflip import beam_search, hotflip_candidates, update_triggers
from mmguard.protect.pgd import (
    at_full_budget,
    fit_noise,
    grid_of,
    grid_size,
    pgd,
    step_sizes,
    upsample_noise,
)
from mmguard.protect.surrogates import TextItem
from mmguard.protect.surrogates.contrastive import ContrastiveSurrogate

EPS = 8 / 255
SHAPES = [(3, 7, 9), (3, 16, 16), (3, 5, 31)]


# -- PGD ----------------------------------------------------------------------
def images_with_extremes(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = []
    for shape in SHAPES:
        image = torch.rand(shape, generator=generator)
        image[0, 0, :3] = 0.0
        image[1, -1, -3:] = 1.0
        image[2, 1, 1] = 1.0
        images.append(image)
    return images


def targets_for(images: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(image.shape, generator=generator) for image in images]


def squared_error(targets: list[torch.Tensor]):
    def loss(perturbed: list[torch.Tensor]) -> torch.Tensor:
        return sum(((x - t) ** 2).sum() for x, t in zip(perturbed, targets, strict=True))
    return loss


def check_in_budget(originals, deltas, eps):
    for x, d in zip(originals, deltas, strict=True):
        assert d.shape == x.shape
        assert not d.requires_grad
        assert float(d.abs().max()) <= eps + 1e-7
        assert float((x + d).min()) >= 0.0 and float((x + d).max()) <= 1.0


@pytest.mark.parametrize("maximize", [False, True])
def test_pgd_stays_in_budget_and_moves_the_loss_the_right_way(maximize):
    originals = images_with_extremes(0)
    # Targets far outside the ball, so every pixel pushes against a bound.
    targets = [torch.where(t > 0.5, 2.0, -1.0) for t in targets_for(originals, 1)]
    loss_fn = squared_error(targets)
    zeros = [torch.zeros_like(x) for x in originals]
    before = float(loss_fn(originals))
    deltas = pgd(originals, zeros, loss_fn, eps=EPS, step_size=2 / 255, steps=10,
                 maximize=maximize)
    check_in_budget(originals, deltas, EPS)
    after = float(loss_fn([x + d for x, d in zip(originals, deltas, strict=True)]))
    assert (after > before) if maximize else (after < before)
    # After 10 steps of 2 levels every pixel sits at the edge of its feasible box.
    for x, d, t in zip(originals, deltas, targets, strict=True):
        toward = torch.where((t > x) != maximize, 1.0, -1.0)
        edge = (x + toward * EPS).clamp(0, 1) - x
        assert torch.allclose(d, edge, atol=1e-6)
    # Pixels at 0 cannot go down, pixels at 1 cannot go up.
    assert float(deltas[0][0, 0, :3].min()) >= 0.0
    assert float(deltas[0][1, -1, -3:].max()) <= 0.0


def test_pgd_descent_reaches_a_target_inside_the_ball():
    originals = images_with_extremes(2)
    generator = torch.Generator().manual_seed(3)
    targets = [(x + (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS / 2).clamp(0, 1)
               for x in originals]
    loss_fn = squared_error(targets)
    deltas = pgd(originals, [torch.zeros_like(x) for x in originals], loss_fn, eps=EPS,
                 step_size=0.25 / 255, steps=40)
    check_in_budget(originals, deltas, EPS)
    for x, d, t in zip(originals, deltas, targets, strict=True):
        assert float((x + d - t).abs().max()) <= 0.25 / 255 + 1e-6


def test_cosine_schedule_settles_where_a_constant_step_keeps_oscillating():
    sizes = step_sizes(2 / 255, 30, "cosine")
    assert sizes[0] == pytest.approx(2 / 255) and sizes[-1] == pytest.approx(0.1 / 255)
    assert all(a > b for a, b in itertools.pairwise(sizes))
    assert step_sizes(2 / 255, 30) == [2 / 255] * 30
    with pytest.raises(ValueError, match="linear"):
        step_sizes(2 / 255, 30, "linear")
    originals = images_with_extremes(8)
    generator = torch.Generator().manual_seed(9)
    targets = [(x + (torch.rand(x.shape, generator=generator) * 2 - 1) * EPS * 0.9).clamp(0, 1)
               for x in originals]
    loss_fn = squared_error(targets)
    errors = {}
    for schedule in ("constant", "cosine"):
        deltas = pgd(originals, [torch.zeros_like(x) for x in originals], loss_fn, eps=EPS,
                     step_size=2 / 255, steps=30, schedule=schedule)
        check_in_budget(originals, deltas, EPS)
        errors[schedule] = max(float((x + d - t).abs().max())
                               for x, d, t in zip(originals, deltas, targets, strict=True))
    # A constant 2-level step ends up to a whole step away from the target; the
    # decaying one within its last, smallest steps.
    assert errors["constant"] > 1 / 255
    assert errors["cosine"] < 0.3 / 255


def test_pgd_projects_an_out_of_budget_start():
    originals = images_with_extremes(4)
    starts = [torch.full_like(x, 0.5) for x in originals]  # far beyond eps
    deltas = pgd(originals, starts, squared_error(targets_for(originals, 5)), eps=EPS,
                 step_size=1 / 255, steps=0)
    check_in_budget(originals, deltas, EPS)
    for x, d in zip(originals, deltas, strict=True):
        assert torch.allclose(d, (x + EPS).clamp(0, 1) - x, atol=1e-7)


@pytest.mark.parametrize("shared", [False, True])
def test_coarse_pgd_gives_smooth_noise_in_budget_that_still_descends(shared):
    generator = torch.Generator().manual_seed(6)
    # Mid-grey images, so no [0, 1] clamp cuts into the noise.
    originals = [0.3 + 0.4 * torch.rand(shape, generator=generator) for shape in SHAPES[1:]]
    targets = [torch.where(t > 0.5, 2.0, -1.0) for t in targets_for(originals, 7)]
    loss_fn = squared_error(targets)
    zeros = [torch.zeros_like(x) for x in originals]
    shared_by = [0, 1] if shared else None
    fine = pgd(originals, zeros, loss_fn, eps=EPS, step_size=2 / 255, steps=10,
               shared_by=shared_by)
    smooth = pgd(originals, zeros, loss_fn, eps=EPS, step_size=2 / 255, steps=10,
                 shared_by=shared_by, coarse=4)
    check_in_budget(originals, smooth, EPS)
    before = float(loss_fn(originals))
    assert float(loss_fn([x + d for x, d in zip(originals, smooth, strict=True)])) < before

    def largest_step(delta: torch.Tensor) -> float:
        return max(float(delta.diff(dim=1).abs().max()), float(delta.diff(dim=2).abs().max()))

    # Bilinear upsampling of a grid in [-eps, eps] by a factor f (4, or less where a side
    # is not a multiple of 4): neighbours differ by at most 2 eps / f; per-pixel PGD on
    # random targets jumps the whole 2 eps.
    for d in smooth:
        height, width = d.shape[1:]
        factor = min(height / math.ceil(height / 4), width / math.ceil(width / 4))
        assert largest_step(d) <= 2 * EPS / factor + 1e-6 < 1.9 * EPS
    assert max(largest_step(d) for d in fine) > 1.9 * EPS


@pytest.mark.parametrize("coarse", [1, 2])
def test_gray_pgd_puts_one_noise_in_every_channel(coarse):
    generator = torch.Generator().manual_seed(8)
    originals = [0.3 + 0.4 * torch.rand(shape, generator=generator) for shape in SHAPES]
    # Channel targets that disagree: per-channel noise would split them apart.
    targets = [torch.where(t > 0.5, 2.0, -1.0) for t in targets_for(originals, 9)]
    loss_fn = squared_error(targets)
    deltas = pgd(originals, [torch.zeros_like(x) for x in originals], loss_fn, eps=EPS,
                 step_size=2 / 255, steps=6, gray=True, coarse=coarse)
    check_in_budget(originals, deltas, EPS)
    for d in deltas:
        assert torch.allclose(d[0], d[1], atol=1e-6) and torch.allclose(d[1], d[2], atol=1e-6)
        assert float(d.abs().max()) > EPS / 2
    before = float(loss_fn(originals))
    assert float(loss_fn([x + d for x, d in zip(originals, deltas, strict=True)])) < before


def test_pgd_whole_level_steps_survive_8bit_quantisation():
    generator = torch.Generator().manual_seed(6)
    originals_u8 = [torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
                    for shape in SHAPES]
    originals_u8[0][0, 0, :4] = 0
    originals_u8[0][1, 0, :4] = 255
    originals = [to_float(u8) for u8 in originals_u8]
    loss_fn = squared_error(targets_for(originals, 7))
    for steps in (3, 12):  # inside the budget, then clipped at it
        deltas = pgd(originals, [torch.zeros_like(x) for x in originals], loss_fn, eps=EPS,
                     step_size=1 / 255, steps=steps)
        check_in_budget(originals, deltas, EPS)
        for u8, x, d in zip(originals_u8, originals, deltas, strict=True):
            perturbed = x + d
            levels = perturbed * 255
            assert float((levels - levels.round()).abs().max()) < 1e-3  # whole levels
            saved = quantize_within_budget(u8, perturbed, EPS)
            assert torch.equal(saved, levels.round().to(torch.uint8))
            assert torch.allclose(to_float(saved), perturbed, atol=1e-6)
            change = (saved.to(torch.int16) - u8.to(torch.int16)).abs()
            assert int(change.max()) == min(steps, 8)


def test_pgd_leaves_model_parameters_without_grad():
    torch.manual_seed(8)
    layer = nn.Linear(16, 4)
    originals = [torch.rand(3, 4, 4), torch.rand(3, 4, 4)]

    def loss_fn(perturbed: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.stack([x.mean(dim=0).reshape(16) for x in perturbed])
        return layer(flat).pow(2).sum()

    deltas = pgd(originals, [torch.zeros_like(x) for x in originals], loss_fn, eps=EPS,
                 step_size=1 / 255, steps=5)
    assert all(parameter.grad is None for parameter in layer.parameters())
    assert any(float(d.abs().max()) > 0 for d in deltas)
    check_in_budget(originals, deltas, EPS)


# -- HotFlip ------------------------------------------------------------------
def test_hotflip_candidates_are_the_brute_force_argmin():
    generator = torch.Generator().manual_seed(10)
    vocab, width, batch, length, top_k = 40, 6, 3, 4, 5
    embedding = torch.randn(vocab, width, generator=generator)
    grads = torch.randn(batch, length, width, generator=generator)
    allowed = torch.tensor([1, 3, 4, 7, 9, 12, 15, 20, 21, 22, 30, 33, 38])
    candidates = hotflip_candidates(grads, embedding, allowed, top_k)
    assert candidates.shape == (batch, length, top_k)
    for b, p in itertools.product(range(batch), range(length)):
        scores = {int(i): float(embedding[i] @ grads[b, p]) for i in allowed}
        expected = sorted(scores, key=scores.get)[:top_k]
        got = candidates[b, p].tolist()
        assert got == expected
        assert all(i in scores for i in got)
        values = [scores[i] for i in got]
        assert values == sorted(values)
    # top_k beyond the allowed set is capped at its size
    assert hotflip_candidates(grads, embedding, allowed, 100).shape == (batch, length, 13)


def table_score(table: torch.Tensor):
    """Separable toy loss: item b's trigger t costs sum_p table[b, p, t[p]]."""

    def score(owners: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(triggers.shape[1])
        return table[owners[:, None], positions[None, :], triggers].sum(dim=1)

    return score


def test_beam_search_finds_the_reachable_optimum():
    generator = torch.Generator().manual_seed(11)
    batch, length, vocab, k = 4, 3, 25, 4
    table = torch.rand(batch, length, vocab, generator=generator)
    current = torch.randint(vocab, (batch, length), generator=generator)
    candidates = torch.randint(vocab, (batch, length, k), generator=generator)
    best, scores = beam_search(current, candidates, table_score(table), beam_width=1)
    for b in range(batch):
        expected = []
        for p in range(length):
            options = [int(current[b, p])] + candidates[b, p].tolist()
            expected.append(min(options, key=lambda t, b=b, p=p: float(table[b, p, t])))
        assert best[b].tolist() == expected
        assert torch.isclose(scores[b], table[b, torch.arange(length), best[b]].sum())
    assert torch.allclose(scores, table_score(table)(torch.arange(batch), best))


def test_beam_search_keeps_the_trigger_when_every_candidate_is_worse():
    batch, length, vocab = 3, 4, 10
    table = torch.ones(batch, length, vocab)
    current = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]])
    for b in range(batch):
        table[b, torch.arange(length), current[b]] = 0.0  # the current token is the best
    candidates = (current[:, :, None] + torch.arange(1, 4)) % vocab  # never the current one
    for width in (1, 3):
        best, scores = beam_search(current, candidates, table_score(table), beam_width=width)
        assert torch.equal(best, current)
        assert torch.equal(scores, torch.zeros(batch))


def test_beam_search_wider_beam_never_worse():
    # A non-separable loss where greedy position-by-position choice is a trap.
    current = torch.tensor([[0, 0]])
    candidates = torch.tensor([[[1, 2], [1, 2]]])
    cost = {(0, 0): 5.0, (1, 0): 4.0, (2, 0): 4.5, (0, 1): 6, (0, 2): 6,
            (1, 1): 4.2, (1, 2): 4.3, (2, 1): 6.0, (2, 2): 0.0}

    def score(owners, triggers):
        return torch.tensor([cost[tuple(t)] for t in triggers.tolist()])

    greedy, greedy_score = beam_search(current, candidates, score, beam_width=1)
    wide, wide_score = beam_search(current, candidates, score, beam_width=3)
    assert greedy.tolist() == [[1, 0]] and float(greedy_score[0]) == 4.0
    assert wide.tolist() == [[2, 2]] and float(wide_score[0]) == 0.0


def interacting_losses():
    """Token 1 alone improves each item; items 0 and 1 changed together make it worse.

    Token 2 changes nothing, token 3 costs 5 per item.
    """
    base, gain, clash = 10.0, torch.tensor([3.0, 2.0, 1.0]), 10.0

    def joint_loss(triggers: torch.Tensor) -> torch.Tensor:
        changed = (triggers[:, 0] == 1).float()
        loss = base - float((gain * changed).sum())
        if changed[0] and changed[1]:
            loss += clash
        loss += 5.0 * float((triggers[:, 0] == 3).sum())
        return torch.tensor(loss)

    def score(owners: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
        out = []
        for owner, trigger in zip(owners.tolist(), triggers, strict=True):
            full = torch.zeros(3, 1, dtype=torch.long)
            full[owner] = trigger
            out.append(joint_loss(full))
        return torch.stack(out)

    return joint_loss, score


def test_update_triggers_falls_back_when_the_joint_change_is_worse():
    joint_loss, score = interacting_losses()
    current = torch.zeros(3, 1, dtype=torch.long)
    candidates = torch.tensor([[[1, 2]], [[1, 2]], [[1, 2]]])  # token 1 improves each alone
    new, before, after = update_triggers(current, candidates, score, joint_loss)
    assert before == 10.0
    assert after <= before
    changed_rows = (new != current).any(dim=1)
    assert int(changed_rows.sum()) <= 1
    # The single most improving change (item 0, gain 3) is kept.
    assert new.tolist() == [[1], [0], [0]] and after == 7.0
    assert after == float(joint_loss(new))


def test_update_triggers_applies_all_changes_when_they_help_together():
    joint_loss, score = interacting_losses()
    current = torch.tensor([[0], [2], [0]])
    candidates = torch.tensor([[[2, 1]], [[2, 2]], [[1, 2]]])  # items 0 and 2 improve
    new, before, after = update_triggers(current, candidates, score, joint_loss)
    assert new.tolist() == [[1], [2], [1]]
    assert before == 10.0 and after == 6.0


def test_update_triggers_unchanged_when_every_candidate_is_worse():
    joint_loss, score = interacting_losses()
    current = torch.zeros(3, 1, dtype=torch.long)
    candidates = torch.full((3, 1, 2), 3)  # token 3 only costs
    new, before, after = update_triggers(current, candidates, score, joint_loss)
    assert torch.equal(new, current) and before == after == 10.0
    assert float(joint_loss(torch.full((3, 1), 3))) == 25.0


# -- HotFlip on a real CLIP -----------------------------------------------------
def test_contrastive_trigger_search_scores_equal_the_batch_loss_recomputed_directly():
    """The surrogate's trigger search (cached image features, one replaced logits
    column per candidate) against InfoNCE of the whole batch recomputed from scratch."""
    surrogate = ContrastiveSurrogate(["rn-test"], seed=0)
    model = surrogate.model.eval()
    records = load_builtin("digits", "train").records[:6]
    images = [to_float(load_image_uint8(r.image, r.where)) for r in records]
    captions = [r.captions[0] for r in records]
    assert len(set(captions)) > 1 and images[0].shape == (3, 8, 8)
    words = torch.tensor(model.word_token_ids())
    length, offset = 3, model.trigger_offset
    generator = torch.Generator().manual_seed(1)
    triggers = words[torch.randint(len(words), (6, length), generator=generator)]
    texts = [TextItem(caption, trigger=tuple(t)) for caption, t in
             zip(captions, triggers.tolist(), strict=True)]
    base_ids = surrogate.ids(texts)
    assert torch.equal(base_ids[:, offset:offset + length], triggers)

    def direct_loss(ids: torch.Tensor) -> float:
        with torch.no_grad():
            return float(info_nce(model.logits(model.encode_images(images),
                                               model.encode_text(ids))))

    search = surrogate.trigger_search(images, texts)
    grads = search.gradients()
    assert grads.shape == (6, length, model.token_embeddings.weight.shape[1])
    candidates = hotflip_candidates(grads, surrogate.embedding_matrix(), words, 4)
    assert candidates.shape == (6, length, 4)
    assert torch.isin(candidates, words).all()
    exact_before = direct_loss(base_ids)
    assert abs(search.joint(triggers) - exact_before) < 1e-5

    # score(m) == InfoNCE of the batch with only item owners[m]'s trigger changed.
    owners = torch.tensor([0, 1, 2, 3, 4, 5, 2, 5])
    new = torch.cat([candidates[:, :, 0], candidates[[2, 5], :, 1]])
    fast = search.score(owners, new)
    for m, owner in enumerate(owners.tolist()):
        ids = base_ids.clone()
        ids[owner, offset:offset + length] = new[m]
        assert abs(float(fast[m]) - direct_loss(ids)) < 1e-5, m
    assert not torch.allclose(fast, torch.full_like(fast, exact_before), atol=1e-6)
    # The unchanged trigger scores the current loss.
    unchanged = search.score(torch.arange(6), triggers)
    assert torch.allclose(unchanged, torch.full((6,), exact_before), atol=1e-5)

    updated, before, after = update_triggers(triggers, candidates, search.score, search.joint)
    ids = base_ids.clone()
    ids[:, offset:offset + length] = updated
    assert abs(after - direct_loss(ids)) < 1e-5
    assert abs(before - exact_before) < 1e-5
    assert after <= before
    assert torch.isin(updated, words).all()
    assert all(parameter.grad is None for parameter in model.parameters())


def test_batch_statistics_mode_leaves_running_statistics_alone():
    surrogate = ContrastiveSurrogate(["rn-test"])
    model = surrogate.model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [n.running_mean.clone() for n in norms]
    momenta = [n.momentum for n in norms]
    images = [torch.rand(3, 32, 32) for _ in range(4)]
    with surrogate.perturbation_mode(batch_statistics=True):
        assert model.training
        train_features = model.encode_images(images)
    assert not model.training
    assert all(torch.equal(b, n.running_mean) for b, n in zip(before, norms, strict=True))
    assert [n.momentum for n in norms] == momenta
    with surrogate.perturbation_mode(batch_statistics=False):
        eval_features = model.encode_images(images)
    # batch statistics really are used: the two modes disagree on a fresh model
    assert not torch.allclose(train_features, eval_features, atol=1e-4)


@pytest.mark.parametrize("shape, coarse", [((3, 28, 28), 4), ((3, 30, 17), 4), ((3, 8, 8), 2)])
def test_a_coarse_grid_resumes_where_it_was_left(shape, coarse):
    # A shared pattern comes back to PGD at every batch that holds its group: its grid
    # must start where the last visit left it, not an area average of it (which smooths
    # the pattern a little more at every visit).
    generator = torch.Generator().manual_seed(9)
    grid = (torch.rand(3, *grid_size(torch.zeros(shape), coarse), generator=generator)
            * 2 - 1) * EPS
    noise = upsample_noise(grid, shape[1:])
    assert torch.allclose(grid_of(noise, grid.shape[1:]), grid, atol=1e-6)
    originals = [torch.full(shape, 0.5)]
    again = noise
    for _ in range(5):  # five visits of zero steps: nothing may change
        again = pgd(originals, [again], squared_error(targets_for(originals, 3)), eps=EPS,
                    step_size=1 / 255, steps=0, shared_by=[0], coarse=coarse)[0]
    assert torch.allclose(again, noise, atol=1e-6)
    pooled = upsample_noise(F.adaptive_avg_pool2d(noise[None], grid.shape[1:])[0], shape[1:])
    assert float((pooled - noise).abs().max()) > 0.05 * EPS  # what an area average loses


def test_a_fixed_grid_of_cells_is_shared_by_images_of_different_sizes():
    # One pattern of 3 x 3 cells for a 12 x 9 and a 30 x 40 image: each image gets the
    # same grid at its own size, and the gradient of both moves it.
    generator = torch.Generator().manual_seed(12)
    originals = [0.3 + 0.4 * torch.rand(shape, generator=generator)
                 for shape in ((3, 12, 9), (3, 30, 40))]
    targets = [torch.where(t > 0.5, 2.0, -1.0) for t in targets_for(originals, 13)]
    only_large = squared_error([originals[0], targets[1]])  # the small image adds nothing
    zeros = [torch.zeros_like(originals[0])]
    [noise] = pgd(originals, zeros, only_large, eps=EPS, step_size=2 / 255, steps=4,
                  shared_by=[0, 0], cells=3)
    assert noise.shape == originals[0].shape  # kept at the given delta's size
    grid = grid_of(noise, (3, 3))
    assert torch.allclose(upsample_noise(grid, (12, 9)), noise, atol=1e-6)
    assert float(grid.abs().max()) > EPS / 2  # moved by the large image's gradient alone
    large = fit_noise(noise, originals[1].shape, cells=3)
    assert torch.allclose(large, upsample_noise(grid, (30, 40)), atol=1e-6)
    before = float(only_large(originals))
    assert float(only_large([originals[0], originals[1] + large])) < before
    # Per image (no sharing), each image gets its own 3 x 3 grid.
    deltas = pgd(originals, [torch.zeros_like(x) for x in originals], squared_error(targets),
                 eps=EPS, step_size=2 / 255, steps=3, cells=3)
    check_in_budget(originals, deltas, EPS)
    for d in deltas:
        assert torch.allclose(upsample_noise(grid_of(d, (3, 3)), d.shape[1:]), d, atol=1e-6)
    assert grid_size(torch.zeros(3, 500, 20), 1, cells=8) == (8, 8)
    with pytest.raises(ValueError, match="not both"):
        grid_size(torch.zeros(3, 8, 8), 2, cells=4)
    with pytest.raises(ValueError, match="fixed grid"):
        fit_noise(noise, (3, 30, 40), cells=0)


def test_a_very_large_grid_falls_back_to_the_area_average(monkeypatch):
    import mmguard.protect.pgd as pgd_module

    noise = torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(10))
    exact = grid_of(noise, (4, 3))
    monkeypatch.setattr(pgd_module, "EXACT_GRID_ENTRIES", 16 * 4 - 1)
    assert torch.equal(grid_of(noise, (4, 3)), F.adaptive_avg_pool2d(noise[None], (4, 3))[0])
    assert not torch.allclose(exact, grid_of(noise, (4, 3)))


def test_full_budget_pushes_each_free_value_to_the_bound_by_its_sign():
    generator = torch.Generator().manual_seed(11)
    noise = (torch.rand(3, 9, 7, generator=generator) * 2 - 1) * EPS * 0.4
    noise[1, 2, 3] = 0.0
    full = at_full_budget(noise, EPS)
    assert torch.equal(full, noise.sign() * EPS)  # per pixel: +-eps, zero stays zero
    assert full[1, 2, 3] == 0.0
    # A luma grid 4 times coarser: each cell goes to +-eps, the result is upsampled
    # again, one value for R, G and B.
    grid = (torch.rand(1, *grid_size(torch.zeros(3, 28, 28), 4), generator=generator)
            * 2 - 1) * EPS * 0.3
    smooth = upsample_noise(grid, (28, 28)).expand(3, 28, 28)
    full = at_full_budget(smooth, EPS, coarse=4, gray=True)
    assert torch.allclose(full, upsample_noise(grid.sign() * EPS, (28, 28)).expand(3, 28, 28),
                          atol=1e-6)
    assert float(full.abs().max()) <= EPS + 1e-6
    assert float(full.abs().mean()) > 2 * float(smooth.abs().mean())
    # On a fixed grid of cells the same, whatever the size.
    full = at_full_budget(upsample_noise(grid, (40, 30)).expand(3, 40, 30), EPS, gray=True,
                          cells=7)
    assert torch.allclose(full, upsample_noise(grid.sign() * EPS, (40, 30)).expand(3, 40, 30),
                          atol=1e-6)
