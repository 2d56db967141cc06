"""EM, MEM and UAP end to end on a tiny real open_clip model and real digits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float
from mmguard.data.sources import read_dataset
from mmguard.data.stealth import linf_levels
from mmguard.errors import MMGuardError
from mmguard.evaluate.audit import audit_folder
from mmguard.models.registry import create_contrastive_model
from mmguard.protect.engine import BilevelMethod
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset
from mmguard.protect.triggers import english_words
from tests.conftest import write_manifest

FAST = dict(surrogates=("rn-test",), batch_size=8, rounds=2, pgd_steps=2, top_k=4,
            train_steps=1, clean_epochs=1)
LIMIT = 16


def protect(method: str, out: Path, **overrides):
    dataset = load_builtin("digits", "train", "pairs")
    method = create_method(method, "pairs", strict=False, **{**FAST, **overrides})
    summary = protect_dataset(dataset, method, out,
                              limit=LIMIT, progress=False)
    return dataset, summary, json.loads((out / "mmguard-run.json").read_text())


def captions(out: Path) -> list[str]:
    return [record.captions[0] for record in read_dataset(out / "manifest.csv").records]


def check_budget(dataset, out: Path, eps_levels: int = 8) -> list[int]:
    changes = []
    for record in read_dataset(out / "manifest.csv").records:
        original = next(r for r in dataset.records
                        if Path(r.image.key).stem == Path(record.image.key).stem)
        saved = read_png_uint8(out / record.image.key)
        changes.append(linf_levels(load_image_uint8(original.image, "o"), saved))
    assert max(changes) <= eps_levels
    return changes


@pytest.mark.parametrize("length", [3, 5])
def test_mem_writes_a_per_image_trigger_that_survives_tokenization(tmp_path, length):
    dataset, summary, record = protect("mem", tmp_path / "out", trigger_len=length)
    assert summary.finished == LIMIT
    model = create_contrastive_model("rn-test")
    originals = [r.captions[0] for r in dataset.records[:LIMIT]]
    triggers = []
    for written, original in zip(captions(tmp_path / "out"), originals, strict=True):
        assert written.endswith(" " + original)
        trigger = written[: -len(original) - 1]
        ids = model.text_token_ids(trigger)
        assert len(ids) == length, trigger  # every trigger word is one token
        assert model.tokenize([written])[0].tolist() == \
            model.compose_ids(ids, model.text_token_ids(original)).tolist()
        triggers.append(trigger)
    assert len(set(triggers)) > 1, "HotFlip never changed a trigger"
    assert triggers != ["the " * (length - 1) + "the"] * LIMIT
    rounds = record["optimisation"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["trigger_changes"] > 0
    assert record["config"]["trigger_len"] == length
    changes = check_budget(dataset, tmp_path / "out")
    assert sum(changes) > 0


def test_mem_natural_triggers_are_dictionary_words(tmp_path):
    protect("mem", tmp_path / "out", natural_triggers=True, rounds=1)
    words = english_words()
    originals = {r.captions[0] for r in load_builtin("digits", "train").records}
    for written in captions(tmp_path / "out"):
        trigger = next(written[: -len(o) - 1] for o in originals if written.endswith(" " + o))
        assert all(word in words for word in trigger.split()), trigger


def test_em_and_uap_perturb_images_but_leave_captions(tmp_path):
    for method in ("em", "uap"):
        out = tmp_path / method
        dataset, summary, record = protect(method, out)
        assert captions(out) == [r.captions[0] for r in dataset.records[:LIMIT]]
        changes = check_budget(dataset, out)
        assert sum(changes) > 0 and summary.finished == LIMIT
    assert len(record["optimisation"]["clean_epoch_losses"]) == 1


def test_interrupted_optimisation_resumes_from_the_last_finished_round(tmp_path, monkeypatch):
    original = BilevelMethod._optimise_batch
    calls = {"n": 0}

    def crash_in_round_two(self, items, round_index, update_trigger):
        if round_index == 1:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return original(self, items, round_index, update_trigger)

    monkeypatch.setattr(BilevelMethod, "_optimise_batch", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        protect("mem", tmp_path / "out")
    progress = json.loads((tmp_path / "out/.mmguard/work/progress.json").read_text())
    assert progress["round"] == 1  # round 1 was checkpointed, round 2 was not
    assert not list((tmp_path / "out" / "images").glob("*.png"))  # nothing emitted yet
    monkeypatch.setattr(BilevelMethod, "_optimise_batch", original)
    summary = protect_dataset(load_builtin("digits", "train", "pairs"),
                              create_method("mem", "pairs", strict=False, **FAST),
                              tmp_path / "out", limit=LIMIT,
                              resume=True, progress=False)
    assert summary.finished == LIMIT
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert [r["round"] for r in record["optimisation"]["rounds"]] == [1, 2]


def test_contrastive_methods_refuse_an_ensemble(tmp_path):
    method = create_method("mem", "pairs", surrogates=("rn-test", "rn-tiny"))
    with pytest.raises(MMGuardError, match="one --surrogate"):
        method.prepare(None, tmp_path / "work")


def test_random_refuses_model_options():
    with pytest.raises(MMGuardError, match="--rounds"):
        create_method("random", rounds=3)


def test_pgd_deltas_are_whole_levels_so_the_saved_file_is_exact(tmp_path):
    _, _, _ = protect("em", tmp_path / "out", rounds=1)
    delta_files = list((tmp_path / "out/.mmguard/work/deltas").glob("*.npy"))
    assert len(delta_files) == LIMIT
    import numpy as np

    for path in delta_files:
        levels = np.load(path).astype(np.float64) * 255
        assert np.allclose(levels, np.round(levels), atol=1e-2)
        assert np.abs(levels).max() <= 8 + 1e-2  # and inside the 8/255 budget


def test_mem_protected_attacker_is_worse_than_clean_on_digits(tmp_path):
    # Note: at this scale the triggers alone explain most of the drop (see the
    # benchmark's controls); this checks the whole protect -> attack path.
    from mmguard.attack.contrastive import AttackerRecipe, load_pairs, train_attacker
    from mmguard.evaluate.retrieval import evaluate_retrieval

    dataset = load_builtin("digits", "train", "pairs")
    method = create_method("mem", "pairs", strict=False, **{**FAST, "rounds": 3,
                                                           "batch_size": 32, "train_steps": 3,
                                                           "surrogate_lr": 1e-3})
    protect_dataset(dataset, method, tmp_path / "out", limit=256,
                    progress=False)
    protected = load_pairs(read_dataset(tmp_path / "out" / "manifest.csv"))
    clean = load_pairs(dataset)
    clean.images, clean.captions = clean.images[:256], clean.captions[:256]
    test = load_pairs(load_builtin("digits", "test", "pairs"))
    recipe = AttackerRecipe(model="rn-test", epochs=15, batch_size=32, lr=1e-3)
    results = {}
    for name, train in (("clean", clean), ("protected", protected)):
        model, _ = train_attacker(train, recipe)
        results[name] = evaluate_retrieval(model, test)["t2i"]["MedR"]
    assert results["protected"] > results["clean"], results


def test_mem_reference_regime_random_triggers_and_round_start_training(tmp_path):
    # trigger_rounds 0: the released triggers are the initial ones, random per image
    _, _, record = protect("mem", tmp_path / "out", trigger_init="random", trigger_rounds=0,
                           round_train_steps=3, train_steps=0, shuffle_every="step", rounds=1)
    model = create_contrastive_model("rn-test")
    written = captions(tmp_path / "out")
    originals = [r.captions[0] for r in load_builtin("digits", "train").records[:LIMIT]]
    triggers = [text[: -len(original) - 1] for text, original in
                zip(written, originals, strict=True)]
    assert len(set(triggers)) > LIMIT // 2
    assert all(len(model.text_token_ids(t)) == 3 for t in triggers)
    assert record["config"]["round_train_steps"] == 3
    # the surrogate trained at the round's start although train_steps is 0
    saved = torch.load(tmp_path / "out/.mmguard/work/surrogate.pt", weights_only=False)
    torch.manual_seed(0)  # the surrogate's own initialisation seed
    fresh = create_contrastive_model("rn-test").state_dict()
    assert any(not torch.equal(saved["model"][k], v) for k, v in fresh.items()
               if v.dtype.is_floating_point)


def test_mem_step_shuffle_rescores_each_pgd_step_with_new_caption_pairs(tmp_path):
    method = create_method("mem", "pairs", surrogates=("rn-test",), shuffle_every="step")
    method.setup(tmp_path / "a")
    from mmguard.protect.surrogates import TextItem

    records = load_builtin("digits", "train").records[:6]
    images = [to_float(load_image_uint8(r.image, r.where)) for r in records]
    texts = [TextItem(r.captions[0], trigger=(1, 2, 3)) for r in records]
    loss = method.noise_loss([], texts, None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = {round(float(loss(images)), 6) for _ in range(4)}
    assert len(values) > 1  # a new shuffle at every call
    fixed = create_method("mem", "pairs", surrogates=("rn-test",))
    fixed.setup(tmp_path / "b")
    fixed_loss = fixed.noise_loss([], texts, None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert len({round(float(fixed_loss(images)), 6) for _ in range(3)}) == 1


def multi_caption_folder(root: Path) -> Path:
    """Four real digit images, three captions each, rows interleaved as in a COCO export."""
    root.mkdir()
    records = load_builtin("digits", "train").records[:4]
    for record in records:
        Image.fromarray(load_image_uint8(record.image, "o").permute(1, 2, 0).numpy()).save(
            root / record.image.key)
    phrasings = ("{}", "the number {}", "{} written by hand")
    rows = [{"image": record.image.key, "caption": phrasing.format(record.captions[0])}
            for phrasing in phrasings for record in records]
    return write_manifest(root, rows)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("noise_per", ["caption", "image"])
def test_mem_noise_per_caption_writes_one_image_per_caption_row(tmp_path, noise_per):
    manifest = multi_caption_folder(tmp_path / "photos")
    before = file_hashes(tmp_path / "photos")
    dataset = read_dataset(manifest)
    method = create_method("mem", "pairs", strict=False,
                           **{**FAST, "rounds": 1, "trigger_init": "random"}, noise_per=noise_per)
    out = tmp_path / "out"
    protect_dataset(dataset, method, out, progress=False)

    released = read_dataset(out / "manifest.csv").records
    assert len(released) == 12
    files = [record.image.key for record in released]
    triggers = []
    for original, record in zip(dataset.records, released, strict=True):
        # Every row keeps its place and its caption, behind its own or its image's trigger.
        caption = original.captions[0]
        assert record.captions[0].endswith(" " + caption)
        triggers.append(record.captions[0][: -len(caption) - 1])
    if noise_per == "caption":
        assert sorted(files) == sorted(f"images/{Path(r.image.key).stem}__c{k}.png"
                                       for k in range(3) for r in dataset.records[:4])
        assert len(set(triggers)) == 12
    else:
        assert sorted(set(files)) == sorted(f"images/{r.image.key}" for r in dataset.records[:4])
        assert len(set(triggers)) == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(f).name for f in set(files))

    saved: dict[str, list[torch.Tensor]] = {}
    for original, file in zip(dataset.records, files, strict=True):
        pixels = read_png_uint8(out / file)
        change = linf_levels(load_image_uint8(original.image, "o"), pixels)
        assert 0 < change <= 8, file  # perturbed, within 8/255 on the saved 8-bit file
        saved.setdefault(original.image.key, []).append(pixels)
    for copies in saved.values():
        distinct = {tuple(c.flatten().tolist()) for c in copies}
        assert len(distinct) == (3 if noise_per == "caption" else 1)
    assert file_hashes(tmp_path / "photos") == before  # originals untouched

    record = json.loads((out / "mmguard-run.json").read_text())
    assert len(record["items"]) == len(set(files))
    assert record["config"]["noise_per"] == noise_per
    assert record["config"].get("release_per") == ("caption" if noise_per == "caption" else None)
    report = audit_folder(out)
    assert report.ok, report.problems
    assert report.items == len(set(files)) and report.texts_checked == 12
