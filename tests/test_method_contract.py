"""The method contract: a new method is one class plus one registry line; methods
run against either surrogate family; bad surrogate names and failed runs end clearly."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float
from mmguard.data.sources import read_dataset
from mmguard.data.stealth import linf_levels
from mmguard.errors import MMGuardError
from mmguard.protect.base import ProtectionItem, option
from mmguard.protect.engine import BilevelConfig, BilevelMethod
from mmguard.protect.pgd import at_full_budget, grid_of, upsample_noise
from mmguard.protect.registry import METHODS, create_method, register_method
from mmguard.protect.run import protect_dataset
from mmguard.protect.surrogates import TextItem
from tests.conftest import cli_env


@dataclass
class ToyConfig(BilevelConfig):
    flip_every: int = option(2, "Score every n-th item with a reversed caption.", min=1)


class ReversedCaptionNoise(BilevelMethod):
    """A toy method for the test: error-minimising noise that binds each image to its
    caption spelled backwards (so the engine, not the method, does all the work)."""

    name = "toy-reversed"
    summary = "test only"
    Config = ToyConfig
    config: ToyConfig

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        return [TextItem(item.texts[0][::-1] if i % self.config.flip_every == 0
                         else item.texts[0]) for i, item in enumerate(items)]


@pytest.fixture
def toy_registered():
    register_method(ReversedCaptionNoise)  # the one registry line
    yield
    METHODS.pop(ReversedCaptionNoise.name)


def _changes(dataset, out) -> list[int]:
    changes = []
    for record in read_dataset(out / "manifest.csv").records:
        original = next(r for r in dataset.records if r.image.key.rsplit("/", 1)[-1].split(".")[0]
                        == record.image.key.rsplit("/", 1)[-1].split(".")[0])
        changes.append(linf_levels(load_image_uint8(original.image, "o"),
                                   read_png_uint8(out / record.image.key)))
    return changes


def test_a_method_defined_here_runs_through_the_engine_once_registered(tmp_path, toy_registered):
    method = create_method("toy-reversed", "pairs", surrogates=("rn-test",), rounds=2,
                           pgd_steps=2, batch_size=8, flip_every=3)
    assert method.config.flip_every == 3 and method.config.train_steps == 1  # engine default
    dataset = load_builtin("digits", "train", "pairs")
    summary = protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert summary.finished == 16 and record["status"] == "complete"
    assert record["config"]["method"] == "toy-reversed" and record["config"]["flip_every"] == 3
    assert [r["round"] for r in record["optimisation"]["rounds"]] == [1, 2]
    changes = _changes(dataset, tmp_path / "out")
    assert max(changes) <= 8 and sum(changes) > 0
    with pytest.raises(MMGuardError, match="does not use --binding"):
        create_method("toy-reversed", binding="bph")


def test_em_runs_against_an_lvlm_surrogate_without_knowing_its_family(tmp_path):
    method = create_method("em", "triples", surrogates=("lvlm-test",), rounds=1, pgd_steps=2,
                           batch_size=3)
    assert method.family == "lvlm"
    dataset = load_builtin("digits", "train", "triples")
    protect_dataset(dataset, method, tmp_path / "out", limit=6, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["config"]["surrogates"] == ["lvlm-test"]
    assert record["optimisation"]["rounds"][0]["train_loss"] > 0
    changes = _changes(dataset, tmp_path / "out")
    assert max(changes) <= 8 and sum(changes) > 0
    # a contrastive surrogate cannot learn from triples: said before any work
    with pytest.raises(MMGuardError, match="does not learn from triples"):
        create_method("em", "triples", surrogates=("rn-test",))


def test_unknown_surrogate_is_a_clear_error_listing_the_known_names(tmp_path):
    with pytest.raises(MMGuardError, match="unknown surrogate 'rn-tinyy'.*rn-tiny.*smolvlm-lite"):
        create_method("mem", "pairs", surrogates=("rn-tinyy",))
    result = subprocess.run(
        [sys.executable, "-m", "mmguard", "protect", "--dataset", "digits", "--method", "mem",
         "--surrogate", "rn-tinyy", "--limit", "4", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 1
    assert "error: unknown surrogate 'rn-tinyy'" in result.stderr and "rn-tiny," in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "mmguard-run.json").exists()


def test_a_run_that_fails_while_preparing_leaves_a_final_run_record(tmp_path):
    method = create_method("em", "pairs", surrogates=("rn-test",),
                           surrogate_pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(MMGuardError, match="missing.pt"):
        protect_dataset(load_builtin("digits", "train", "pairs"), method, tmp_path / "out",
                        limit=4, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["status"] == "failed" and "missing.pt" in record["error"]
    assert record["optimisation"] == {"surrogates": ["rn-test"], "rounds": []}


def _mixed_size_folder(root: Path) -> Path:
    """Two images of different sizes with one answer (one noise group), two with another."""
    root.mkdir()
    rows = []
    for name, size, answer in (("small.png", (8, 8), "a test"), ("large.png", (12, 10), "a test"),
                               ("other.png", (9, 9), "a cat"), ("wide.png", (16, 6), "a cat")):
        pixels = np.random.default_rng(0).integers(40, 216, (size[1], size[0], 3), np.uint8)
        Image.fromarray(pixels).save(root / name)
        rows.append({"image": name, "prompt": "What is this?", "response": answer})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def test_shared_noise_on_images_of_different_sizes_names_the_item(tmp_path):
    manifest = _mixed_size_folder(tmp_path / "data")
    method = create_method("mmguard", "triples", surrogates=("lvlm-test",), rounds=1,
                           pgd_steps=1, batch_size=2, components="image",
                           noise_groups="response")
    with pytest.raises(MMGuardError, match=r"(small|large)\.png: one noise pattern is shared"
                       r".*--cells N"):
        protect_dataset(read_dataset(manifest), method, tmp_path / "out", progress=False)


@pytest.mark.parametrize("name", ["shift-pattern", "class-pattern"])
def test_a_fixed_grid_of_cells_lets_images_of_different_sizes_share_a_pattern(tmp_path, name):
    manifest = _mixed_size_folder(tmp_path / "data")
    options = ({"surrogates": ("lvlm-test",), "pgd_steps": 3, "batch_size": 2}
               if name == "shift-pattern" else {})
    method = create_method(name, "triples", cells=2, gray_noise=True, **options)
    protect_dataset(read_dataset(manifest), method, tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["config"]["cells"] == 2
    deltas = {}
    for item in record["items"]:
        original = read_png_uint8(tmp_path / "data" / item["key"]).float()
        saved = read_png_uint8(tmp_path / "out" / item["file"]).float()
        deltas[item["key"]] = (saved - original) / 255
        assert 0 < float(deltas[item["key"]].abs().max()) <= 8 / 255 + 1e-6
    # Both files carry one 2 x 2 luma grid, each at its own size (to 8-bit rounding).
    small, large = deltas["small.png"], deltas["large.png"]
    grid = grid_of(large.mean(dim=0, keepdim=True), (2, 2))
    assert float((upsample_noise(grid, (8, 8)) - small.mean(dim=0, keepdim=True)).abs().max()
                 ) <= 1.01 / 255
    assert float((upsample_noise(grid, (10, 12)) - large).abs().max()) <= 1.01 / 255
    with pytest.raises(MMGuardError, match="coarse.*or as cells.*not both"):
        create_method(name, "triples", cells=2, coarse=2, **options)


@pytest.mark.parametrize("kind, surrogate", [("pairs", "rn-test"), ("triples", "lvlm-test")])
def test_wrong_target_moves_features_to_the_permuted_group(tmp_path, kind, surrogate):
    method = create_method("wrong-target", kind, surrogates=(surrogate,), pgd_steps=8,
                           batch_size=8, groups=3, eps=16 / 255, step_size=2 / 255,
                           target="centroid")
    dataset = load_builtin("digits", "train", kind)
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    groups = record["optimisation"]["groups"]
    assert groups == (3 if kind == "pairs" else len({r.response for r in dataset.records[:16]}))
    # every group is sent to another one
    assert all(method.target_of[k] != method.group_of[k] for k in method.group_of)
    protected = read_dataset(tmp_path / "out" / "manifest.csv")
    keys = list(method.group_of)

    def share_at_target(images) -> float:
        with torch.no_grad(), method.surrogate.perturbation_mode():
            nearest = method._logits(method.surrogate.image_features(images)).argmax(dim=1)
        return float((nearest == torch.tensor([method.target_of[k] for k in keys])).float()
                     .mean())

    clean = [to_float(load_image_uint8(r.image, "c")) for r in
             [dataset.records[i] for i in [list(dataset.records_by_image())
                                           .index(k) for k in keys]]]
    saved = [to_float(read_png_uint8(tmp_path / "out" / r.image.key)) for r in
             list({r.image.key: r for r in protected.records}.values())]
    assert share_at_target(saved) > share_at_target(clean) + 0.2


def test_wrong_target_can_first_train_its_surrogate_on_the_clean_data(tmp_path):
    options = dict(surrogates=("rn-test",), pgd_steps=2, batch_size=8, groups=2,
                   clean_epochs=4, surrogate_lr=1e-3)
    method = create_method("wrong-target", "pairs", **options)
    dataset = load_builtin("digits", "train", "pairs")
    untrained = create_method("wrong-target", "pairs", **{**options, "clean_epochs": 0})
    untrained.setup(tmp_path / "untrained")
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    losses = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())[
        "optimisation"]["clean_epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]  # it learned the clean pairs
    # The targets were chosen in the trained tower's feature space, not the initial one.
    key = next(iter(method.features_of))
    image = [to_float(load_image_uint8(dataset.records[0].image, "c"))]
    with torch.no_grad(), method.surrogate.perturbation_mode(), \
            untrained.surrogate.perturbation_mode():
        assert not torch.allclose(method.surrogate.image_features(image),
                                  untrained.surrogate.image_features(image), atol=1e-4)
    assert key in method.target_image_of
    # A resumed run keeps the trained surrogate instead of training it again.
    again = create_method("wrong-target", "pairs", **options)
    protect_dataset(dataset, again, tmp_path / "out", limit=16, progress=False, resume=True)
    assert again.pretrain_losses == losses


def test_wrong_target_pretrained_too_also_moves_the_pretrained_towers_features(tmp_path):
    options = dict(surrogates=("rn-test",), pgd_steps=10, batch_size=8, groups=3,
                   eps=16 / 255, step_size=2 / 255, clean_epochs=4, surrogate_lr=1e-3)
    dataset = load_builtin("digits", "train", "pairs")
    ratios = {}
    for both in (False, True):
        method = create_method("wrong-target", "pairs", pretrained_too=both, **options)
        out = tmp_path / f"both-{both}"
        protect_dataset(dataset, method, out, limit=16, progress=False)
        rounds = json.loads((out / "mmguard-run.json").read_text())["optimisation"]["rounds"]
        ratios[both] = rounds[0]
    # Only the ensemble reports the pretrained tower's features, and moves them further
    # than the release crafted on the trained tower alone; the trained tower is still moved.
    assert "pretrained_target_distance_ratio" not in ratios[False]
    assert ratios[True]["target_distance_ratio"] < 0.8

    def pretrained_ratio(out: Path) -> float:
        released = {Path(r.image.key).stem: r
                    for r in read_dataset(out / "manifest.csv").records}
        keys = list(method.target_image_of)
        images = [to_float(read_png_uint8(out / released[Path(k).stem].image.key))
                  for k in keys]
        with torch.no_grad(), method.pretrained.perturbation_mode():
            features = method.pretrained.image_features(images)
        clean = torch.stack([method.pretrained_features_of[k] for k in keys])
        wanted = torch.stack([method.pretrained_features_of[method.target_image_of[k]]
                              for k in keys])
        return float(((features - wanted).norm(dim=1) / (clean - wanted).norm(dim=1)).mean())

    alone, ensemble = pretrained_ratio(tmp_path / "both-False"), pretrained_ratio(
        tmp_path / "both-True")
    assert ensemble < 0.8 and ensemble < alone - 0.05, (alone, ensemble)
    # The pretrained tower is the fresh one, not the trained surrogate.
    image = [to_float(load_image_uint8(dataset.records[0].image, "c"))]
    with torch.no_grad(), method.surrogate.perturbation_mode(), \
            method.pretrained.perturbation_mode():
        assert not torch.allclose(method.surrogate.image_features(image),
                                  method.pretrained.image_features(image), atol=1e-4)
    with pytest.raises(MMGuardError, match="pretrained_too needs clean_epochs"):
        create_method("wrong-target", "pairs", pretrained_too=True, surrogates=("rn-test",))


def test_wrong_target_retrains_its_tower_on_the_release_between_rounds(tmp_path):
    options = dict(surrogates=("rn-test",), pgd_steps=4, batch_size=8, groups=3,
                   eps=16 / 255, step_size=2 / 255, clean_epochs=2, surrogate_lr=1e-3,
                   rounds=2)
    dataset = load_builtin("digits", "train", "pairs")
    runs = {}
    for steps in (0, 3):
        method = create_method("wrong-target", "pairs", retrain_steps=steps, **options)
        out = tmp_path / f"retrain-{steps}"
        protect_dataset(dataset, method, out, limit=16, progress=False)
        runs[steps] = method
    still, retrained = runs[0].surrogate, runs[3].surrogate
    image = [to_float(load_image_uint8(dataset.records[0].image, "c"))]
    with torch.no_grad(), still.perturbation_mode(), retrained.perturbation_mode():
        # Same clean training, then 3 steps on the release: the towers now differ ...
        assert not torch.allclose(still.image_features(image),
                                  retrained.image_features(image), atol=1e-4)
        # ... and the targets are read on the retrained tower, not the clean-trained one.
        key = runs[3].target_image_of[next(iter(runs[3].target_image_of))]
        index = [Path(r.image.key).name for r in dataset.records].index(key)
        target_image = [to_float(load_image_uint8(dataset.records[index].image, "c"))]
        assert torch.allclose(runs[3].features_of[key],
                              retrained.image_features(target_image)[0].cpu(), atol=1e-4)
        assert not torch.allclose(runs[0].features_of[key], runs[3].features_of[key],
                                  atol=1e-4)
    history = runs[3].history
    assert len(history) == 2 and history[1]["target_distance_ratio"] < 0.95
    # In passes: 1.5 passes over 16 images in batches of 8 are the same 3 steps.
    by_passes = create_method("wrong-target", "pairs", retrain_epochs=1.5, **options)
    assert by_passes.retraining_steps(16) == 3 and by_passes.retraining_steps(17) == 5
    protect_dataset(dataset, by_passes, tmp_path / "retrain-passes", limit=16, progress=False)
    with torch.no_grad(), retrained.perturbation_mode(), by_passes.surrogate.perturbation_mode():
        assert torch.allclose(by_passes.surrogate.image_features(image),
                              retrained.image_features(image), atol=1e-6)
    with pytest.raises(MMGuardError, match="retraining happens between rounds"):
        create_method("wrong-target", "pairs", retrain_steps=3, surrogates=("rn-test",))
    with pytest.raises(MMGuardError, match="retraining happens between rounds"):
        create_method("wrong-target", "pairs", retrain_epochs=1, surrogates=("rn-test",))
    with pytest.raises(MMGuardError, match="retrain_steps or retrain_epochs, not both"):
        create_method("wrong-target", "pairs", retrain_steps=3, retrain_epochs=1, rounds=2,
                      surrogates=("rn-test",))


def test_wrong_target_image_collides_with_one_image_of_the_target_group(tmp_path):
    method = create_method("wrong-target", "pairs", surrogates=("rn-test",), pgd_steps=10,
                           batch_size=8, groups=3, eps=16 / 255, step_size=2 / 255)
    assert method.config.target == "image"
    dataset = load_builtin("digits", "train", "pairs")
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    targets = method.target_image_of
    # the target image lies in the permuted group, and the targets of a group are used alike
    assert all(method.group_of[targets[k]] == method.target_of[k] for k in targets)
    uses: dict[str, int] = {}
    for target in targets.values():
        uses[target] = uses.get(target, 0) + 1
    for group in set(method.group_of.values()):
        counts = [uses.get(k, 0) for k, g in method.group_of.items() if g == group]
        if any(counts):
            assert max(counts) - min(counts) <= 1
    protected = {Path(r.image.key).stem: r
                 for r in read_dataset(tmp_path / "out" / "manifest.csv").records}
    keys = list(targets)
    with torch.no_grad(), method.surrogate.perturbation_mode():
        saved = method.surrogate.image_features([
            to_float(read_png_uint8(tmp_path / "out" / protected[Path(k).stem].image.key))
            for k in keys])
    clean = torch.stack([method.features_of[k] for k in keys])
    wanted = torch.stack([method.features_of[targets[k]] for k in keys])
    before = (clean - wanted).norm(dim=1)
    after = (saved - wanted).norm(dim=1)
    assert float((after / before).mean()) < 0.8
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["optimisation"]["rounds"][0]["target_distance_ratio"] < 0.8


def _clean_and_saved(dataset, keys, out: Path) -> tuple[dict, dict]:
    """The clean and the released image of each original key, as floats."""
    clean = {r.image.key: to_float(load_image_uint8(r.image, "c")) for r in dataset.records}
    saved = {}
    for record in read_dataset(out / "manifest.csv").records:
        original = next(k for k in keys if Path(k).stem == Path(record.image.key).stem)
        saved[original] = to_float(read_png_uint8(out / record.image.key))
    return clean, saved


def test_wrong_target_nearest_pairing_picks_nearer_targets_than_random(tmp_path):
    dataset = load_builtin("digits", "train", "pairs")
    distance, shift = {}, {}
    for pairing in ("random", "nearest"):
        method = create_method("wrong-target", "pairs", surrogates=("rn-test",), pgd_steps=1,
                               batch_size=8, groups=4, pairing=pairing)
        protect_dataset(dataset, method, tmp_path / pairing, limit=24, progress=False)
        targets = method.target_image_of
        assert all(method.group_of[targets[k]] == method.target_of[k] != method.group_of[k]
                   for k in targets)
        distance[pairing] = float(torch.stack([
            (method.features_of[k] - method.features_of[t]).norm()
            for k, t in targets.items()]).mean())
        shift[pairing] = {g: method.target_of[k] for k, g in method.group_of.items()}
    assert distance["nearest"] < 0.9 * distance["random"]
    # every group still goes to another, and no two groups to the same one
    assert sorted(shift["nearest"].values()) == sorted(shift["nearest"])


def test_wrong_target_group_noise_is_one_pattern_per_group_that_moves_its_images(tmp_path):
    method = create_method("wrong-target", "pairs", surrogates=("rn-test",), pgd_steps=6,
                           batch_size=8, groups=3, eps=16 / 255, step_size=2 / 255,
                           noise_groups="group")
    dataset = load_builtin("digits", "train", "pairs")
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    clean, saved = _clean_and_saved(dataset, method.group_of, tmp_path / "out")
    eps = 16 / 255
    by_group: dict[int, list[str]] = {}
    for key, group in method.group_of.items():
        by_group.setdefault(group, []).append(key)
    patterns = []
    for keys in by_group.values():
        first = keys[0]
        delta = saved[first] - clean[first]
        assert float(delta.abs().max()) > 0  # the group's images were changed
        for key in keys[1:]:
            # where neither image is clipped at 0 or 1, both carry the same change
            inside = ((clean[first] > eps) & (clean[first] < 1 - eps) & (clean[key] > eps)
                      & (clean[key] < 1 - eps))
            other = saved[key] - clean[key]
            assert torch.allclose(delta[inside], other[inside], atol=0.5 / 255)
        patterns.append(method.store.delta(f"group {method.group_of[first]}", delta.shape))
    assert not torch.allclose(patterns[0], patterns[1])  # one pattern per group, not one
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["optimisation"]["rounds"][0]["target_distance_ratio"] < 1


def test_wrong_target_member_units_weigh_each_ensemble_member_in_its_own_units(tmp_path):
    method = create_method("wrong-target", "triples", surrogates=("lvlm-test", "lvlm-test"),
                           pgd_steps=3, batch_size=8, eps=16 / 255, step_size=2 / 255,
                           member_units=True)
    dataset = load_builtin("digits", "train", "triples")
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    keys = list(method.target_image_of)
    matrix = torch.stack([method.features_of[k] for k in keys])
    # two members side by side: two parts covering the whole vector, each with its unit
    half = matrix.shape[1] // 2
    assert method.parts == [slice(0, half), slice(half, 2 * half)]
    for part, scale in zip(method.parts, method.part_scales, strict=True):
        labels = torch.tensor([method.group_of[k] for k in keys])
        block = matrix[:, part]
        centroids = torch.stack([block[labels == g].mean(dim=0) for g in labels.unique()])
        pairs = len(centroids) * (len(centroids) - 1)
        assert scale == pytest.approx(float(torch.cdist(centroids, centroids).sum() / pairs))
    # the loss is the sum of the members' squared distances, each over its unit squared
    by_key = {r.image.key: r for r in dataset.records}
    pixels = [to_float(load_image_uint8(by_key[k].image, k)) for k in keys[:4]]
    items = [ProtectionItem(k, x, []) for k, x in zip(keys[:4], pixels, strict=True)]
    loss = method.noise_loss(items, [], None, torch.Generator())
    with torch.no_grad(), method.surrogate.perturbation_mode():
        parts = method.surrogate.image_feature_parts(pixels)
        got = float(loss(pixels))
    wanted = torch.stack([method.features_of[method.target_image_of[k]] for k in keys[:4]])
    expected = sum(float((f - wanted[:, part]).pow(2).sum(dim=1).mean()) / scale ** 2
                   for f, part, scale in zip(parts, method.parts, method.part_scales,
                                             strict=True))
    assert got == pytest.approx(expected, rel=1e-4)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    first = record["optimisation"]["rounds"][0]
    assert first["member_0_distance_ratio"] < 1 and first["member_1_distance_ratio"] < 1
    # nearest pairing weighs the members alike too: shrinking one member's features a
    # thousandfold does not hand the choice of targets to the other
    labels = torch.tensor([method.group_of[k] for k in keys])
    mixed = matrix.clone()
    mixed[:, method.parts[1]] = torch.randn(mixed[:, method.parts[1]].shape,
                                            generator=torch.Generator().manual_seed(0))
    shrunk = mixed.clone()
    shrunk[:, method.parts[0]] *= 1e-3
    assert method._nearest_targets(keys, shrunk, labels) == method._nearest_targets(
        keys, mixed, labels)
    with pytest.raises(MMGuardError, match="member_units needs the image target"):
        create_method("wrong-target", "triples", surrogates=("lvlm-test",), target="centroid",
                      member_units=True)


def test_cluster_em_shares_one_pattern_per_cluster_then_refines_per_image(tmp_path):
    dataset = load_builtin("digits", "train", "pairs")
    method = create_method("cluster-em", "pairs", surrogates=("rn-test",), rounds=1,
                           pgd_steps=2, batch_size=8, clusters=3, cluster_features="rn-test")
    protect_dataset(dataset, method, tmp_path / "shared", limit=16, progress=False)
    clusters = method.cluster_of
    assert len(clusters) == 16 and set(clusters.values()) == {0, 1, 2}
    saved = {r.image.key: read_png_uint8(tmp_path / "shared" / r.image.key).float()
             for r in read_dataset(tmp_path / "shared" / "manifest.csv").records}
    originals = {k: load_image_uint8(r.image, "o").float() for k, r in
                 zip(saved, [dataset.records[i] for i in range(16)], strict=True)}
    deltas = {k: saved[k] - originals[k] for k in saved}
    by_cluster: dict[int, list[str]] = {}
    for (key, _), cluster in zip(deltas.items(), clusters.values(), strict=True):
        by_cluster.setdefault(cluster, []).append(key)
    # images of one cluster carry one pattern (up to clipping at 0 and 255)
    for keys in by_cluster.values():
        first = deltas[keys[0]]
        for key in keys[1:]:
            unclipped = (originals[key] > 8) & (originals[key] < 247) & \
                        (originals[keys[0]] > 8) & (originals[keys[0]] < 247)
            assert torch.equal(deltas[key][unclipped], first[unclipped])
    refine = create_method("cluster-em", "pairs", surrogates=("rn-test",), rounds=1,
                           refine_rounds=1, pgd_steps=2, batch_size=8, clusters=3,
                           cluster_features="rn-test")
    protect_dataset(dataset, refine, tmp_path / "refined", limit=16, progress=False)
    record = json.loads((tmp_path / "refined" / "mmguard-run.json").read_text())
    assert [r["round"] for r in record["optimisation"]["rounds"]] == [1, 2]
    assert len(list((tmp_path / "refined/.mmguard/work/deltas").glob("*.npy"))) == 3 + 16


def _saved_deltas(dataset, out: Path, count: int) -> tuple[dict, dict]:
    saved = {r.image.key: read_png_uint8(out / r.image.key).float()
             for r in read_dataset(out / "manifest.csv").records}
    originals = {k: load_image_uint8(r.image, "o").float() for k, r in
                 zip(saved, [dataset.records[i] for i in range(count)], strict=True)}
    return {k: saved[k] - originals[k] for k in saved}, originals


def test_class_pattern_gives_every_image_of_an_answer_the_same_fixed_pattern(tmp_path):
    dataset = load_builtin("fashion-mnist", "train", "triples")
    method = create_method("class-pattern", "triples", seed=3)
    protect_dataset(dataset, method, tmp_path / "out", limit=24, progress=False)
    deltas, originals = _saved_deltas(dataset, tmp_path / "out", 24)
    answers = [dataset.records[i].response for i in range(24)]
    keys = list(deltas)
    inside = {k: (originals[k] >= 8) & (originals[k] <= 247) for k in keys}  # never clipped
    pairs_same = pairs_other = 0
    for i in range(24):
        assert deltas[keys[i]].abs().max() <= 8
        assert torch.equal(deltas[keys[i]][inside[keys[i]]].abs(),
                           torch.full_like(deltas[keys[i]][inside[keys[i]]], 8.0))  # sign: +-eps
        for j in range(i + 1, 24):
            both = inside[keys[i]] & inside[keys[j]]
            if both.sum() < 50:
                continue
            same = torch.equal(deltas[keys[i]][both], deltas[keys[j]][both])
            assert same == (answers[i] == answers[j])
            pairs_same += answers[i] == answers[j]
            pairs_other += answers[i] != answers[j]
    assert pairs_same > 5 and pairs_other > 50
    # another seed draws other patterns; the same seed the same ones, batch by batch
    again = create_method("class-pattern", "triples", seed=3)
    other = create_method("class-pattern", "triples", seed=4)
    item = ProtectionItem("x", torch.full((3, 28, 28), 0.5), ["q"], ["sneaker"])
    assert torch.equal(again.pattern("answer sneaker", item.image),
                       method.pattern("answer sneaker", item.image))
    assert not torch.equal(other.pattern("answer sneaker", item.image),
                           method.pattern("answer sneaker", item.image))


def test_class_pattern_on_pairs_shares_per_cluster_and_keeps_large_images_low_frequency(tmp_path):
    dataset = load_builtin("digits", "train", "pairs")
    method = create_method("class-pattern", "pairs", clusters=3, cluster_features="rn-test")
    protect_dataset(dataset, method, tmp_path / "out", limit=12, progress=False)
    assert len(method.cluster_of) == 12 and set(method.cluster_of.values()) == {0, 1, 2}
    deltas, originals = _saved_deltas(dataset, tmp_path / "out", 12)
    keys = list(deltas)
    groups = [method.cluster_of[k] for k in method.cluster_of]
    for i in range(12):
        for j in range(i + 1, 12):
            both = (originals[keys[i]] >= 8) & (originals[keys[i]] <= 247) & \
                   (originals[keys[j]] >= 8) & (originals[keys[j]] <= 247)
            if both.sum() >= 20:
                assert torch.equal(deltas[keys[i]][both], deltas[keys[j]][both]) == \
                    (groups[i] == groups[j])
    coarse = create_method("class-pattern", "pairs", coarse=64, gray_noise=True,
                           values="uniform")
    pattern = coarse.pattern("cluster 0", torch.zeros(3, 512, 512))
    assert pattern.abs().max() <= 8 / 255 + 1e-7
    assert torch.equal(pattern[0], pattern[1]) and torch.equal(pattern[1], pattern[2])
    # an 8x8 grid upsampled: neighbouring pixels differ by at most 2 eps / 64
    assert float(pattern.diff(dim=-1).abs().max()) <= 2 * (8 / 255) / 64 + 1e-6
    assert not torch.equal(pattern, coarse.pattern("cluster 1", torch.zeros(3, 512, 512)))


def test_sign_noise_is_the_per_image_control_of_class_pattern():
    image = torch.full((3, 28, 28), 0.5)
    items = [ProtectionItem(key, image, ["q"], ["sneaker"]) for key in ("a", "b")]
    signs = [out.image - image for out in
             create_method("random", "triples", values="sign").protect_batch(items)]
    shared = [out.image - image for out in
              create_method("class-pattern", "triples").protect_batch(items)]
    for noise in signs + shared:
        assert torch.allclose(noise.abs(), torch.full_like(noise, 8 / 255), atol=1e-6)
    assert not torch.equal(signs[0], signs[1])  # drawn per image
    assert torch.equal(shared[0], shared[1])  # one answer, one pattern
    # the default uniform control is drawn as before (cached control runs stay valid)
    from mmguard.protect.seeding import item_generator

    uniform = create_method("random", "triples").protect_batch(items[:1])[0].image - image
    drawn = torch.rand((3, 28, 28), generator=item_generator(0, "a")) * (16 / 255) - 8 / 255
    assert torch.allclose(uniform, drawn, atol=1e-6)


def test_grating_values_are_one_oriented_wave_per_group_at_the_grids_scale():
    method = create_method("class-pattern", "triples", cells=16, gray_noise=True,
                           values="grating")
    image = torch.full((3, 128, 128), 0.5)
    pattern = method.pattern("answer a", image)
    assert torch.equal(pattern[0], pattern[1]) and torch.equal(pattern[1], pattern[2])
    assert float(pattern.abs().max()) <= 8 / 255 + 1e-7
    assert float(pattern.abs().max()) > 0.95 * 8 / 255  # amplitude eps, not a faint wave
    # one sinusoid: its spectrum is a single peak at 16 / 2 = 8 cycles across the image
    spectrum = torch.fft.fft2(pattern[0]).abs()
    spectrum[0, 0] = 0
    row, col = divmod(int(spectrum.argmax()), 128)
    radius = (min(row, 128 - row) ** 2 + min(col, 128 - col) ** 2) ** 0.5
    assert abs(radius - 8) < 1.0
    assert float(spectrum.pow(2).sum()) * 0.9 < float(
        spectrum.pow(2).flatten().topk(8).values.sum())  # energy in the peak's few bins
    # other groups get other waves; the same group the same wave at another size's scale
    assert not torch.allclose(pattern, method.pattern("answer b", image))
    large = method.pattern("answer a", torch.full((3, 512, 512), 0.5))
    assert torch.allclose(torch.nn.functional.avg_pool2d(large, 4), pattern, atol=1e-3)
    # colour gratings draw a wave per channel; the per-image control draws them per image
    colour = create_method("class-pattern", "triples", cells=16, values="grating")
    assert not torch.allclose(colour.pattern("answer a", image)[0],
                              colour.pattern("answer a", image)[1])
    items = [ProtectionItem(key, image, ["q"], ["a"]) for key in ("x", "y")]
    waves = [out.image - image for out in create_method(
        "random", "triples", cells=16, gray_noise=True, values="grating").protect_batch(items)]
    assert not torch.allclose(waves[0], waves[1])
    # square: the same wave's sign, every pixel at the bound
    square = create_method("class-pattern", "triples", cells=16, gray_noise=True,
                           values="square").pattern("answer a", image)
    assert torch.equal(square, torch.sign(pattern) * (8 / 255))


def _wave_peak(pattern: torch.Tensor) -> tuple[float, float]:
    """The orientation (degrees in [0, 180)) and cycles across the image of a square
    pattern's strongest Fourier peak."""
    size = pattern.shape[-1]
    spectrum = torch.fft.fft2(pattern).abs()
    spectrum[0, 0] = 0
    row, col = divmod(int(spectrum.argmax()), size)
    row, col = (row if row <= size // 2 else row - size), (col if col <= size // 2 else col - size)
    return float(np.degrees(np.arctan2(row, col))) % 180, float(np.hypot(row, col))


def test_class_pattern_spread_layout_gives_each_answer_a_wave_of_its_own_orientation(tmp_path):
    dataset = load_builtin("fashion-mnist", "train", "triples")
    method = create_method("class-pattern", "triples", cells=16, gray_noise=True,
                           values="grating", layout="spread", seed=2)
    protect_dataset(dataset, method, tmp_path / "out", limit=40, progress=False)
    answers = sorted({dataset.records[i].response for i in range(40)})
    assert sorted(method.wave_of) == [f"answer {a}" for a in answers] and len(answers) >= 8
    # each answer's wave, read back from its spectrum: orientations evenly spread (180/n
    # degrees apart), neighbours alternately at 8 and 12 cycles (1 and 1.5 x 16 / 2)
    probe = torch.zeros(3, 128, 128)
    peaks = sorted(_wave_peak(method.pattern(group, probe)[0]) for group in method.wave_of)
    step = 180 / len(answers)
    gaps = [(peaks[(i + 1) % len(peaks)][0] - peaks[i][0]) % 180 for i in range(len(peaks))]
    assert all(abs(gap - step) < 0.45 * step for gap in gaps), gaps
    radii = [round(radius / 4) * 4 for _, radius in peaks]
    assert set(radii) == {8, 12}
    assert all(radii[i] != radii[i + 1] for i in range(len(radii) - 1)), peaks
    # random orientations (the default) do not keep them apart on this seed
    drawn = create_method("class-pattern", "triples", cells=16, gray_noise=True,
                          values="grating", seed=2)
    random_peaks = sorted(_wave_peak(drawn.pattern(group, probe)[0])[0]
                          for group in method.wave_of)
    assert min((random_peaks[(i + 1) % len(peaks)] - random_peaks[i]) % 180
               for i in range(len(peaks))) < 0.45 * step
    # the release carries its answer's wave (quantised to whole levels)
    deltas, originals = _saved_deltas(dataset, tmp_path / "out", 40)
    for i, key in enumerate(deltas):
        inside = (originals[key] >= 8) & (originals[key] <= 247)
        wave = method.pattern(f"answer {dataset.records[i].response}", originals[key]) * 255
        assert float((deltas[key] - wave)[inside].abs().max()) <= 0.51
    with pytest.raises(MMGuardError, match="give values grating or square"):
        create_method("class-pattern", "triples", layout="spread")


def test_word_code_spells_each_image_code_from_the_words_of_its_text():
    image = torch.full((3, 32, 32), 0.5)
    method = create_method("word-code", "pairs", seed=1)

    def code(key: str, *texts: str) -> torch.Tensor:
        return method.protect_batch([ProtectionItem(key, image, list(texts))])[0].image - image

    red_apple, red_car, blue_sky = (code("a", "a red apple"), code("b", "red car"),
                                    code("c", "Blue, sky."))
    for noise in (red_apple, red_car, blue_sky):
        assert torch.allclose(noise.abs(), torch.full_like(noise, 8 / 255), atol=1e-6)
    # The code is a function of the words (case, punctuation and order aside)...
    assert torch.equal(code("d", "sky blue"), blue_sky)
    assert torch.equal(code("e", "A red apple", "apple red a"), red_apple)
    # ...so captions that share words share part of their code, unrelated ones do not.
    def agreement(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((torch.sign(x) == torch.sign(y)).float().mean())
    assert agreement(red_car, code("f", "red")) > 0.65  # 2 words: red decides 3/4 of cells
    assert abs(agreement(red_car, blue_sky) - 0.5) < 0.1
    # A single word's code is its pattern, readable by a linear probe: its correlation
    # with every image whose text holds the word is positive.
    red = torch.sign(code("g", "red"))
    assert float((torch.sign(red_apple) * red).mean()) > 0.2
    assert float((torch.sign(blue_sky) * red).mean()) < 0.1
    # Triples spell it from the responses; a text of symbols gets the image's own code.
    answer = method.protect_batch([ProtectionItem("h", image, ["what is it?"], ["red"])])
    assert torch.equal(answer[0].image - image, code("i", "red"))
    symbols = code("j", "🙂 !!")
    assert torch.allclose(symbols.abs(), torch.full_like(symbols, 8 / 255), atol=1e-6)
    assert not torch.equal(symbols, code("k", "🙂 !!"))
    # Another seed draws other patterns; a coarse grid keeps large images low-frequency.
    other = create_method("word-code", "pairs", seed=2)
    assert not torch.equal(other.protect_batch([ProtectionItem("a", image, ["red"])])[0].image
                           - image, code("a", "red"))
    coarse = create_method("word-code", "pairs", coarse=64, gray_noise=True)
    big = torch.full((3, 512, 512), 0.5)
    noise = coarse.protect_batch([ProtectionItem("a", big, ["red car"])])[0].image - big
    assert torch.equal(noise[0], noise[2])
    assert float(noise.diff(dim=-1).abs().max()) <= 2 * (8 / 255) / 64 + 1e-6


def test_wrong_target_on_batch_statistics_moves_features_as_a_training_tower_reads_them(
        tmp_path):
    # An attacker who trains the tower normalises each batch by its own statistics; a
    # release crafted under the running ones need not move the features it sees then.
    options = dict(surrogates=("rn-test",), pgd_steps=10, batch_size=8, groups=3,
                   eps=16 / 255, step_size=2 / 255, clean_epochs=4, surrogate_lr=1e-3)
    dataset = load_builtin("digits", "train", "pairs")
    methods = {}
    for bn in ("running", "batch"):
        methods[bn] = create_method("wrong-target", "pairs", surrogate_bn=bn, **options)
        protect_dataset(dataset, methods[bn], tmp_path / bn, limit=16, progress=False)
    tower = methods["batch"].surrogate
    keys = list(methods["batch"].target_image_of)
    clean_images = {r.image.key: to_float(load_image_uint8(r.image, r.image.key))
                    for r in dataset.records[:16]}

    def training_view(images: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), tower.perturbation_mode(batch_statistics=True):
            return tower.image_features(images)  # all 16 in one batch

    clean = training_view([clean_images[k] for k in keys])
    row = {k: i for i, k in enumerate(keys)}

    def ratio(bn: str) -> float:
        # Each release against its own targets (k-means ran in its own view of the tower).
        wanted = clean[[row[methods[bn].target_image_of[k]] for k in keys]]
        released = {Path(r.image.key).stem: r
                    for r in read_dataset(tmp_path / bn / "manifest.csv").records}
        features = training_view([to_float(read_png_uint8(
            tmp_path / bn / released[Path(k).stem].image.key)) for k in keys])
        return float(((features - wanted).norm(dim=1) / (clean - wanted).norm(dim=1)).mean())

    running, batch = ratio("running"), ratio("batch")
    assert batch < 0.8 and batch < running - 0.05, (running, batch)
    with pytest.raises(MMGuardError):
        create_method("wrong-target", "pairs", surrogate_bn="both", surrogates=("rn-test",))


@pytest.mark.parametrize("drawn, luma_collision",
                         [({}, False),
                          ({"cells": 4, "gray_noise": True, "values": "square"}, True)],
                         ids=["per-pixel-signs", "luma-square-wave-grid-luma-collision"])
def test_wrong_target_pattern_share_collides_around_the_class_pattern(tmp_path, drawn,
                                                                      luma_collision):
    eps, share = 16 / 255, 0.5
    method = create_method("wrong-target", "triples", surrogates=("lvlm-test",), pgd_steps=8,
                           batch_size=8, eps=eps, step_size=2 / 255, pattern_share=share,
                           gray_noise=luma_collision,
                           **{f"pattern_{name}": value for name, value in drawn.items()})
    dataset = load_builtin("digits", "train", "triples")
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    clean = {r.image.key: (to_float(load_image_uint8(r.image, "c")), r.response)
             for r in dataset.records}
    pattern = create_method("class-pattern", "triples", eps=eps, **drawn)
    saved, with_pattern, keys = [], [], []
    for record in read_dataset(tmp_path / "out" / "manifest.csv").records:
        key = next(k for k in method.group_of if Path(k).stem == Path(record.image.key).stem)
        if key in keys:
            continue
        image, answer = clean[key]
        # the fixed part is class-pattern's pattern of the answer, at share * eps
        center = share * pattern.pattern(f"answer {answer}", image)
        delta = to_float(read_png_uint8(tmp_path / "out" / record.image.key)) - image
        inside = (image > eps) & (image < 1 - eps)
        assert float((delta - center)[inside].abs().max()) <= (1 - share) * eps + 0.5 / 255
        assert float(delta.abs().max()) <= eps + 1e-6
        # at share 0.5 the noise keeps the pattern's sign wherever it is not zero
        moved = inside & (delta.abs() > 0.5 / 255)
        assert bool((delta[moved].sign() == center[moved].sign()).all())
        if luma_collision:  # the collision's move is one value for R, G and B
            offset = (delta - center)[:, inside.all(dim=0)]
            assert float((offset - offset.mean(dim=0)).abs().max()) <= 0.5 / 255 + 1e-6
            assert float(offset.abs().max()) > 2 / 255  # and it did move
        keys.append(key)
        saved.append(image + delta)
        with_pattern.append((image + center).clamp(0, 1))
    # the rest of the budget collides: nearer the target images than the pattern alone
    with torch.no_grad(), method.surrogate.perturbation_mode():
        after = method.surrogate.image_features(saved)
        start = method.surrogate.image_features(with_pattern)
    wanted = torch.stack([method.features_of[method.target_image_of[k]] for k in keys])
    assert float((after - wanted).norm(dim=1).mean()) < 0.9 * float(
        (start - wanted).norm(dim=1).mean())
    with pytest.raises(MMGuardError, match="give pattern_share"):
        create_method("wrong-target", "triples", surrogates=("lvlm-test",), pattern_cells=8)


@pytest.mark.parametrize("kind, surrogate, direction, smooth", [
    ("triples", "lvlm-test", "random", False), ("pairs", "rn-test", "wrong", False),
    ("triples", "lvlm-test", "random", True)])
def test_shift_pattern_moves_each_groups_features_along_its_direction(tmp_path, kind,
                                                                       surrogate, direction,
                                                                       smooth):
    eps = 16 / 255
    grid = {"coarse": 2, "gray_noise": True} if smooth else {}
    method = create_method("shift-pattern", kind, surrogates=(surrogate,), pgd_steps=6,
                           batch_size=8, groups=3, eps=eps, step_size=2 / 255,
                           direction=direction, **grid)
    dataset = load_builtin("digits", "train", kind)
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    clean, saved = _clean_and_saved(dataset, method.group_of, tmp_path / "out")
    keys = list(method.group_of)
    groups = sorted(set(method.group_of.values()))
    assert len(groups) >= 2
    # one pattern per group, distinct between groups, within the budget
    patterns = [method.store.delta(f"group {g}", clean[keys[0]].shape) for g in groups]
    assert not torch.allclose(patterns[0], patterns[1])
    assert all(float(p.abs().max()) <= eps + 1e-6 for p in patterns)
    if smooth:  # luma only (one noise in R, G and B) and low-frequency: neighbours differ
        # by at most half a grid cell's step (per-pixel signs differ by up to 2 eps)
        assert all(torch.equal(p[0], p[1]) and torch.equal(p[0], p[2]) for p in patterns)
        assert all(float(p.diff(dim=-1).abs().max()) <= eps + 1e-6 for p in patterns)
        assert max(float(p.diff(dim=-1).abs().mean()) for p in patterns) < 0.75 * eps
    if direction == "wrong":  # toward another group's centroid, unit length
        assert torch.allclose(method.directions[0].norm(dim=1), torch.ones(len(groups)))
    # the optimised patterns shift the features along their directions further than the
    # random signs they started from
    items = [ProtectionItem(k, clean[k], []) for k in keys]
    start = [(clean[k] + method.initial_noise(item)).clamp(0, 1)
             for k, item in zip(keys, items, strict=True)]
    with torch.no_grad(), method.surrogate.perturbation_mode():
        after = float(method._shift(items, [saved[k] for k in keys]))
        before = float(method._shift(items, start))
    assert after > before and after > 0
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["optimisation"]["rounds"][0]["shift_along_direction"] > 0


def test_shift_pattern_at_full_budget_releases_each_pattern_at_the_bound(tmp_path):
    eps = 16 / 255
    method = create_method("shift-pattern", "triples", surrogates=("lvlm-test",), pgd_steps=3,
                           batch_size=8, eps=eps, step_size=2 / 255, coarse=2, gray_noise=True,
                           full_budget=True)
    dataset = load_builtin("digits", "train", "triples")
    protect_dataset(dataset, method, tmp_path / "out", limit=16, progress=False)
    clean, saved = _clean_and_saved(dataset, method.group_of, tmp_path / "out")
    for key, image in clean.items():
        if key not in saved:
            continue
        optimised = method.store.delta(f"group {method.group_of[key]}", image.shape)
        wanted = at_full_budget(optimised, eps, coarse=2, gray=True)
        inside = (image + wanted > 0) & (image + wanted < 1)  # not clipped
        released = saved[key] - image
        # the optimised pattern, each grid cell pushed to +-eps (up to 8-bit rounding)
        assert float((released - wanted)[inside].abs().max()) <= 0.5 / 255 + 1e-6
        assert float(wanted.abs().mean()) > float(optimised.abs().mean())
