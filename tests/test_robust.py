"""Differentiable stand-ins for the attacker's transformations (EOT inside PGD)."""

from __future__ import annotations

import json

import pytest
import torch

from mmguard.attack import augment
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float
from mmguard.errors import MMGuardError
from mmguard.protect.base import ProtectionItem
from mmguard.protect.registry import create_method
from mmguard.protect.robust import TRANSFORMS, expectation_over, jpeg, parse_robust
from mmguard.protect.run import protect_dataset


@pytest.fixture(scope="module")
def emoji():
    return [to_float(load_image_uint8(r.image, "x"))
            for r in load_builtin("emoji", "test").records[:3]]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_transform_keeps_shape_and_range_and_passes_gradients(emoji, name):
    image = emoji[0].clone().requires_grad_(True)
    out = TRANSFORMS[name](image, torch.Generator().manual_seed(0))
    assert out.shape == image.shape
    assert float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1
    (grad,) = torch.autograd.grad(out.sum(), image)
    assert float(grad.abs().sum()) > 0


def test_stand_ins_track_the_real_transformations(emoji):
    for image in emoji:
        real = augment.jpeg(image, 75)
        # close to real JPEG next to the untouched image (4:2:0 chroma, quality-75 tables,
        # real rounding), and so is what it makes of noise
        assert float((jpeg(image) - real).abs().mean()) < 0.25 * float((image - real).abs().mean())
        noise = (torch.rand(image.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) / 32
        noisy = (image + noise).clamp(0, 1)
        real_noisy = augment.jpeg(noisy, 75)
        assert float((jpeg(noisy) - real_noisy).abs().mean()) < 0.25 * float(
            (noisy - real_noisy).abs().mean())
        assert torch.allclose(TRANSFORMS["grayscale"](image, None), augment.grayscale(image),
                              atol=1e-6)


def test_expectation_draws_a_transformation_per_call(emoji):
    calls = []
    loss = expectation_over(("grayscale",), lambda images: calls.append(images) or
                            images[0].sum(), torch.Generator().manual_seed(0))
    for _ in range(12):
        loss(emoji[:1])
    grays = sum(bool(torch.equal(c[0][0], c[0][1])) for c in calls)
    assert 0 < grays < 12  # both the untouched and the grayscale images are used
    # every=True scores the untouched and the grayscale images in each call, averaged
    calls.clear()
    every = expectation_over(("grayscale",), lambda images: calls.append(images) or
                             images[0][0].sum(), torch.Generator().manual_seed(0), every=True)
    value = every(emoji[:1])
    assert len(calls) == 2 and not torch.equal(calls[0][0][0], calls[0][0][1])
    assert torch.equal(calls[1][0][0], calls[1][0][1])
    gray = TRANSFORMS["grayscale"](emoji[0], None)
    assert torch.isclose(value, (emoji[0][0].sum() + gray[0].sum()) / 2)
    assert parse_robust("jpeg, blur") == ("jpeg", "blur") and parse_robust("") == ()
    with pytest.raises(MMGuardError, match="unknown sepia"):
        parse_robust("jpeg,sepia")


def test_robust_option_runs_through_the_engine(tmp_path):
    method = create_method("em", "pairs", surrogates=("rn-test",), rounds=1, pgd_steps=3,
                           batch_size=8, robust="jpeg,grayscale,crop")
    protect_dataset(load_builtin("digits", "train", "pairs"), method, tmp_path / "out",
                    limit=8, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["config"]["robust"] == "jpeg,grayscale,crop"
    assert 0 < max(item["linf_levels"] for item in record["items"]) <= 8


@pytest.mark.parametrize("name", ["em", "random"])
def test_coarse_option_makes_the_saved_noise_low_frequency(tmp_path, name):
    options = {"surrogates": ("rn-test",), "rounds": 1, "pgd_steps": 4,
               "batch_size": 8} if name == "em" else {}

    def roughness(coarse: int) -> float:
        out = tmp_path / f"coarse{coarse}"
        method = create_method(name, "pairs", coarse=coarse, **options)
        data = load_builtin("emoji", "train", "pairs")
        protect_dataset(data, method, out, limit=8, progress=False)
        record = json.loads((out / "mmguard-run.json").read_text())
        assert record["config"]["coarse"] == coarse
        rough, size = 0.0, 0.0
        refs = {ref.key: ref for ref in data.images()}
        for item in record["items"]:
            original = to_float(load_image_uint8(refs[item["key"]], item["key"]))
            saved = torch.as_tensor(read_png_uint8(out / item["file"])[:3])
            delta = to_float(saved) - original
            laplacian = (4 * delta[:, 1:-1, 1:-1] - delta[:, :-2, 1:-1] - delta[:, 2:, 1:-1]
                         - delta[:, 1:-1, :-2] - delta[:, 1:-1, 2:])
            rough += float(laplacian.abs().sum())
            size += float(delta[:, 1:-1, 1:-1].abs().sum())
        assert size > 0
        return rough / size

    # High-frequency share of the saved noise: per-pixel noise is mostly edges.
    assert roughness(8) < 0.5 * roughness(1)


def test_gray_uniform_control_is_luma_only_and_in_budget():
    image = 0.25 + 0.5 * torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(1))
    item = ProtectionItem("a.png", image, ["a cat"])
    gray = create_method("random", "pairs", gray_noise=True, coarse=2).protect_batch([item])
    plain = create_method("random", "pairs").protect_batch([item])
    delta = gray[0].image - image
    assert float(delta.abs().max()) <= 8 / 255 + 1e-7
    for channel in (1, 2):
        assert torch.allclose(delta[0], delta[channel], atol=1e-6)
    assert not torch.allclose((plain[0].image - image)[0], (plain[0].image - image)[1])
