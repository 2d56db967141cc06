import pytest
import torch

from mmguard.data.budget import (
    levels,
    parse_eps,
    project_to_ball,
    quantize_release,
    quantize_within_budget,
)
from mmguard.data.images import DecodedImage
from mmguard.data.stealth import linf_levels, psnr_db
from mmguard.errors import MMGuardError
from mmguard.protect.pgd import grid_of, pgd, project_delta, upsample_noise


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.0314", 0.0314), ("1", 1.0),
                                         (" 16/255 ", 16 / 255)])
def test_parse_eps_accepts_fractions_and_decimals(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-8/255", "1.5", "256/255", "abc", "8/0", "nan", "inf", ""])
def test_parse_eps_rejects_values_outside_the_unit_interval(text):
    with pytest.raises(MMGuardError, match="budget"):
        parse_eps(text)


def test_levels_rounds_down_but_keeps_exact_fractions():
    assert levels(8 / 255) == 8
    assert levels(0.0314) == 8  # 8.007 levels
    assert levels(0.03) == 7  # 7.65 levels: 8 would break the budget
    assert levels(1.0) == 255


@pytest.mark.parametrize("eps", [8 / 255, 0.03, 4 / 255, 1.5 / 255])
def test_quantized_change_never_exceeds_budget(eps):
    generator = torch.Generator().manual_seed(1)
    original = torch.randint(0, 256, (3, 31, 17), generator=generator, dtype=torch.uint8)
    base = original.float() / 255
    # Push every pixel to the edge of (and past) the float ball.
    noise = (torch.rand(base.shape, generator=generator) * 2 - 1) * eps * 1.3
    perturbed = base + noise
    quantized = quantize_within_budget(original, perturbed, eps)
    assert quantized.dtype == torch.uint8
    assert linf_levels(original, quantized) <= levels(eps)
    assert linf_levels(original, quantized) == levels(eps)  # the bound is reached, not undershot


def test_quantize_rejects_budget_below_one_level():
    original = torch.zeros(3, 2, 2, dtype=torch.uint8)
    with pytest.raises(MMGuardError, match="below one 8-bit level"):
        quantize_within_budget(original, original.float() / 255, 0.5 / 255)


def test_projection_stays_in_ball_and_unit_range():
    original = torch.tensor([0.0, 0.5, 1.0])
    projected = project_to_ball(torch.tensor([-1.0, 0.9, 2.0]), original, 0.1)
    assert torch.allclose(projected, torch.tensor([0.0, 0.6, 1.0]))


def test_pgd_delta_projection():
    x = torch.tensor([0.0, 0.5, 1.0, 0.99, 0.01])
    d = torch.tensor([-0.2, 0.2, 0.2, 0.02, -0.003])
    out = project_delta(x, d, 0.05)
    assert torch.allclose(out, torch.tensor([0.0, 0.05, 0.0, 0.01, -0.003]), atol=1e-7)


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.03, 16 / 255])
def test_one_projection_is_bit_identical_to_clipping_the_delta(eps):
    # PGD used to clip the delta, random noise the sum; released files depend on both
    # forms giving the very same float32 bits.
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 256, (3, 32, 32), generator=generator).float() / 255
        d = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps * 3
        clipped_delta = (x + d.clamp(-eps, eps)).clamp(0.0, 1.0) - x
        assert torch.equal(project_delta(x, d, eps), clipped_delta)
        assert torch.equal(project_to_ball(x + d, x, eps),
                           (x + d.clamp(-eps, eps)).clamp(0.0, 1.0))


def test_psnr_matches_hand_computation():
    a = torch.zeros(3, 2, 2, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0] = 12  # mse = 144 / 12
    assert psnr_db(a, b) == pytest.approx(10 * torch.log10(torch.tensor(255.0**2 / 12)).item())
    assert psnr_db(a, a) == float("inf")


def test_release_of_a_transparent_image_moves_only_its_colour_within_budget():
    colour = torch.tensor([[[0, 100, 250, 40]], [[30, 0, 255, 7]], [[200, 9, 1, 128]]],
                          dtype=torch.uint8)
    alpha = torch.tensor([[[255, 0, 128, 3]]], dtype=torch.uint8)
    rgb = torch.tensor([[[0, 255, 252, 251]], [[30, 255, 255, 250]], [[200, 255, 128, 253]]],
                       dtype=torch.uint8)  # colour over white, as models see it
    original = DecodedImage(rgb, colour, alpha)
    change = torch.tensor([5.0, -20.0, 3.0, -2.6]).view(1, 1, 4).expand(3, 1, 4) / 255
    released = quantize_release(original, rgb.double() / 255 + change, 8 / 255)
    assert released.shape == (4, 1, 4)
    assert torch.equal(released[3:], alpha)
    moved = released[:3].int() - colour.int()
    # +5 and -3 levels land on the stored colour (clipped to [0, 255]); -20 to the budget.
    assert moved[:, 0, 0].tolist() == [5, 5, 5]
    assert moved[:, 0, 1].tolist() == [-8, 0, -8]
    assert moved[:, 0, 2].tolist() == [3, 0, 3]
    assert moved[:, 0, 3].tolist() == [-3, -3, -3]
    opaque = DecodedImage(rgb, rgb)
    assert torch.equal(quantize_release(opaque, rgb.double() / 255 + change, 8 / 255),
                       quantize_within_budget(rgb, rgb.double() / 255 + change, 8 / 255))


@pytest.mark.parametrize("shared", [False, True])
def test_pgd_around_centers_stays_within_eps_of_each_center(shared):
    # A loss that pulls every pixel to 0.5 drives the deltas to their bounds; each must
    # end within eps of its center (and its image in [0, 1]), not within eps of zero.
    generator = torch.Generator().manual_seed(1)
    # away from 0 and 1, so no pixel is cut by the [0, 1] range
    originals = [0.2 + 0.6 * torch.rand(3, 8, 8, generator=generator) for _ in range(2)]
    centers = [torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), -0.1)]
    eps = 0.05

    def loss(images):
        return sum((image - 0.5).pow(2).sum() for image in images)

    deltas = pgd(originals, [c.clone() for c in centers], loss, eps=eps, step_size=0.02,
                 steps=10, shared_by=[0, 1] if shared else None, centers=centers)
    for x, d, c in zip(originals, deltas, centers, strict=True):
        assert float((d - c).abs().max()) <= eps + 1e-6
        assert float((d - c).abs().max()) > eps / 2  # it moved: the bound is the center's
        if not shared:
            assert float((x + d).min()) >= 0.0 and float((x + d).max()) <= 1.0


@pytest.mark.parametrize("grid", [{"gray": True}, {"coarse": 2}, {"cells": 2, "gray": True}],
                         ids=["luma", "coarse-2", "luma-2x2-cells"])
def test_grid_pgd_moves_around_centers_in_its_own_form(grid):
    # The grid is the move from each center: the result stays within eps of the center,
    # differs from it by a luma (or coarse) move only, and reaches past half of eps.
    generator = torch.Generator().manual_seed(2)
    originals = [0.2 + 0.6 * torch.rand(3, 8, 8, generator=generator) for _ in range(2)]
    centers = [0.1 * torch.sign(torch.randn(3, 8, 8, generator=generator)) for _ in range(2)]
    eps = 0.05

    def loss(images):
        return sum((image - 0.5).pow(2).sum() for image in images)

    deltas = pgd(originals, [c.clone() for c in centers], loss, eps=eps, step_size=0.02,
                 steps=10, centers=centers, **grid)
    for x, d, c in zip(originals, deltas, centers, strict=True):
        move = d - c
        assert float(move.abs().max()) <= eps + 1e-6
        assert float(move.abs().max()) > eps / 2
        assert float((x + d).min()) >= 0.0 and float((x + d).max()) <= 1.0
        if grid.get("gray"):
            assert float((move - move.mean(dim=0)).abs().max()) < 1e-6
        # a move on a grid is its own grid upsampled again (the per-pixel center is not)
        side = grid.get("cells") or 8 // grid.get("coarse", 1)
        if side < 8:
            assert torch.allclose(move, upsample_noise(grid_of(move, (side, side)), (8, 8)),
                                  atol=1e-6)
            assert not torch.allclose(c, upsample_noise(grid_of(c, (side, side)), (8, 8)))
