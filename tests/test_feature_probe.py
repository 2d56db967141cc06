"""benchmarks/feature_probe.py: the screen of a wrong-target release's feature move."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from benchmarks.feature_probe import probe, tower_features
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image
from mmguard.data.sources import read_dataset
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset
from mmguard.protect.surrogates import create_surrogate


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "release"
    method = create_method("wrong-target", "triples", surrogates=("lvlm-test",),
                           pgd_steps=12, batch_size=8)
    protect_dataset(load_builtin("fashion-mnist", "train", "triples"), method, out, limit=12,
                    progress=False)
    return out


def test_probe_sees_the_move_on_the_surrogate_and_none_on_clean_files(release, tmp_path):
    moved = probe(release, "fashion-mnist", "lvlm-test", "none")
    assert moved["images"] == 12
    assert moved["moved"] > 0.2  # white box: the collision went a good part of the way
    # The same release with its images swapped for the originals has not moved at all.
    clean = tmp_path / "clean"
    shutil.copytree(release, clean)
    records = {r.image.key: r for r in load_builtin("fashion-mnist", "train", "triples").records}
    for row in read_dataset(clean / "manifest.csv").records:
        key = row.image.key.split("/")[-1]
        original = load_image(records[key].image, key)
        Image.fromarray(original.colour.permute(1, 2, 0).numpy()).save(clean / row.image.key)
    still = probe(clean, "fashion-mnist", "lvlm-test", "none")
    assert abs(still["moved"]) < 1e-6 and still["at_own"] == still["clean_at_own"]


def test_batch_statistics_features_come_back_in_order_and_leave_running_stats_alone():
    surrogate = create_surrogate(["rn-test"])
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))
              for i in range(10)]
    before = tower_features(surrogate, images)
    training = tower_features(surrogate, images, batch_statistics=True)
    # One shuffled batch of ten: the same statistics whatever the order, so each row
    # must come back to its own image.
    reversed_rows = tower_features(surrogate, images[::-1], batch_statistics=True)
    assert torch.allclose(training, reversed_rows.flip(0), atol=1e-5)
    assert not torch.allclose(training, before, atol=1e-3)  # BatchNorm did use the batch
    assert torch.equal(tower_features(surrogate, images), before)  # running statistics untouched
