"""benchmarks/shortcut_probe.py: a linear attacker on a frozen tower, trained on a release."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from benchmarks.shortcut_probe import probe
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8
from mmguard.protect.grouping import answer_groups

LIMIT, HELD_OUT = 60, 60


def write_release(out, image_of):
    """A release folder of the first LIMIT Fashion-MNIST training triples, each image
    replaced by image_of(record, answer index)."""
    records = load_builtin("fashion-mnist", "train", "triples").records[:LIMIT]
    groups = answer_groups([r.image.key for r in records],
                           {r.image.key: r.response for r in records})
    (out / "images").mkdir(parents=True)
    for record, group in zip(records, groups, strict=True):
        pixels = image_of(record, group)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(
            out / "images" / record.image.key.split("/")[-1])
    return out


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortcut")
    originals = write_release(root / "originals",
                              lambda record, _: load_image_uint8(record.image, record.image.key))

    # The answer as a flat grey level, no content.
    shortcut = write_release(root / "shortcut", lambda record, group: torch.full_like(
        load_image_uint8(record.image, record.image.key), 20 * group))
    return originals, shortcut


def test_the_originals_score_as_clean_data_and_a_pure_shortcut_fails_on_clean_images(releases):
    originals, shortcut = releases
    [same] = probe([originals], "fashion-mnist", LIMIT, HELD_OUT, ["lvlm-test"], 8 / 255, 0)
    assert same["release"] == same["clean"]
    assert same["clean"] > 0.3  # ten answers: the tower's features carry the content
    [fooled] = probe([shortcut], "fashion-mnist", LIMIT, HELD_OUT, ["lvlm-test"], 8 / 255, 0)
    # Trained on grey levels that name the answer, the classifier has nothing to read
    # on clean images: far below clean training, near one answer in ten.
    assert fooled["release"] < fooled["clean"] - 0.15
    assert fooled["relative_drop"] > 0.3


def test_a_release_missing_an_image_is_named(releases, tmp_path):
    originals, _ = releases
    broken = tmp_path / "broken"
    shutil.copytree(originals, broken)
    missing = sorted((broken / "images").iterdir())[3]
    missing.unlink()
    with pytest.raises(SystemExit, match=missing.name):
        probe([broken], "fashion-mnist", LIMIT, HELD_OUT, ["lvlm-test"], 8 / 255, 0)


def test_a_transformation_is_applied_to_every_training_set_and_named(releases):
    originals, _ = releases
    plain, blurred = probe([originals], "fashion-mnist", LIMIT, HELD_OUT, ["lvlm-test"],
                           8 / 255, 0, augments=("none", "blur:3"))
    assert (plain["augment"], blurred["augment"]) == ("none", "blur:3")
    # The originals go through the same transformation as the clean set...
    assert blurred["release"] == blurred["clean"]
    # ...and a strong blur of the training images changes what the classifier learns.
    assert blurred["clean"] != plain["clean"]
