"""The efficacy lab: every control is built from the right images and texts, and scored;
releases made per caption row (MEM noise_per=caption) in the lab and in --mix-clean."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmguard.attack.contrastive import ImageCaptionSet, load_pairs
from mmguard.data.builtin import emoji as emoji_module
from mmguard.data.builtin import emoji_captions as captions_module
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float
from mmguard.data.sources import read_dataset
from mmguard.errors import MMGuardError
from mmguard.evaluate.attacker import AttackerEvaluation, evaluate_attacker
from mmguard.evaluate.protocol import mix_clean
from mmguard.lab import (
    CONTROLS,
    ControlCache,
    LabSetting,
    _recipe,
    append_row,
    attack_once,
    attacker_sets,
    audited_stealth,
    hold_out,
    lab_row_name,
    parse_attacker,
    protect_once,
    run_lab,
    split_training,
    training_sets,
    training_spec,
    uniform_options,
)
from mmguard.protect.registry import create_method, parse_options
from tests.conftest import write_manifest

TINY = dict(surrogates=("rn-test",), rounds=1, pgd_steps=2, batch_size=8, top_k=4)


def test_lab_row_has_every_control_with_final_and_best_scores(tmp_path):
    setting = LabSetting(dataset="digits", kind="pairs", method="mem", options=TINY,
                         attackers=("rn-test:scratch:epochs=2,batch_size=8",), seeds=(0,),
                         limit=24, holdout=0.25)
    row = run_lab(setting, tmp_path / "work", log=lambda line: None)
    assert row["train_images"] == 18 and row["test_images"] == 6  # the held-out slice
    results = row["attackers"]["rn-test:scratch:epochs=2,batch_size=8"]
    assert set(results) == {"clean", "uniform", "method", "noise only", "trigger only"}
    for control in results.values():
        assert len(control["epochs"][0]) == 2  # scored after each epoch
        final, best = control["final"], control["best"]
        assert best["i2t R@10"]["mean"] >= final["i2t R@10"]["mean"]
        assert best["i2t MedR"]["mean"] <= final["i2t MedR"]["mean"]
    assert row["protect"]["max_linf_levels"] <= 8
    append_row(tmp_path / "lab.json", tmp_path / "lab.md", "first", row)
    append_row(tmp_path / "lab.json", tmp_path / "lab.md", "second", row)
    assert list(json.loads((tmp_path / "lab.json").read_text())["rows"]) == ["first", "second"]
    assert (tmp_path / "lab.md").read_text().count("| first | validation |") == 4
    # A release that changes no image (text only) has no finite PSNR: the table says so.
    row["protect"].update(mean_psnr_db=None, mean_ssim=1.0)
    append_row(tmp_path / "lab.json", tmp_path / "lab.md", "text only", row)
    assert (tmp_path / "lab.md").read_text().count("| ∞ / 1.000 |") == 4


def test_controls_swap_images_and_texts_of_the_protected_and_clean_sets(tmp_path):
    setting = LabSetting(dataset="digits", kind="pairs", method="mem", options=TINY,
                         attackers=(), seeds=(0,), limit=12)
    run_lab(setting, tmp_path / "work", log=lambda line: None)
    train_part, _ = split_training(setting)
    sets = training_sets(setting, train_part, tmp_path / "work/protected",
                         tmp_path / "work/uniform")
    clean, method = sets["clean"], sets["method"]
    assert sets["noise only"].images is method.images
    assert sets["noise only"].captions is clean.captions
    assert sets["trigger only"].images is clean.images
    assert sets["trigger only"].captions is method.captions
    assert all(m[0].endswith(" " + c[0]) for m, c in zip(method.captions, clean.captions,
                                                         strict=True))


def test_controls_are_reused_across_rows_and_trigger_free_rows_skip_the_swaps(tmp_path):
    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    cache = ControlCache(tmp_path / "controls.json")
    first = LabSetting(dataset="digits", kind="pairs", method="random", attackers=(attacker,),
                       seeds=(0,), limit=16)
    lines: list[str] = []
    row = run_lab(first, tmp_path / "a", log=lines.append, cache=cache)
    # no trigger: noise only is the method itself, trigger only the clean set
    assert set(row["attackers"][attacker]) == {"clean", "uniform", "method"}
    assert not any("cached" in line for line in lines)
    stored = json.loads((tmp_path / "controls.json").read_text())
    assert len(stored) == 2
    second = LabSetting(dataset="digits", kind="pairs", method="mem", options=TINY,
                        attackers=(attacker,), seeds=(0,), limit=16)
    lines.clear()
    again = run_lab(second, tmp_path / "b", log=lines.append,
                    cache=ControlCache(tmp_path / "controls.json"))
    assert sum("cached" in line for line in lines) == 2
    for name in ("clean", "uniform"):
        reused = again["attackers"][attacker][name]["final"]
        assert reused == row["attackers"][attacker][name]["final"]
    # another slice is another setting: nothing reused
    lines.clear()
    run_lab(LabSetting(dataset="digits", kind="pairs", method="random", attackers=(attacker,),
                       seeds=(0,), limit=20), tmp_path / "c", log=lines.append, cache=cache)
    assert not any("cached" in line for line in lines)
    # another budget: the clean run is shared, the uniform one is not
    lines.clear()
    run_lab(dataclasses.replace(first, eps=4 / 255), tmp_path / "d", log=lines.append,
            cache=cache)
    assert [line.split(", seed")[0] for line in lines if "cached" in line] == [
        f"{attacker} on clean"]


def test_a_killed_row_resumes_its_method_runs_but_not_on_a_new_release(tmp_path):
    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    setting = LabSetting(dataset="digits", kind="pairs", method="mem", options=TINY,
                         attackers=(attacker,), seeds=(0, 1), limit=16)
    first = run_lab(setting, tmp_path / "work", log=lambda line: None)
    lines: list[str] = []
    again = run_lab(setting, tmp_path / "work", log=lines.append)
    resumed = [line.split(":")[0] for line in lines if line.endswith("(resumed)")]
    assert len(resumed) == 6  # method, noise only, trigger only; two seeds each
    assert again["attackers"][attacker]["method"]["final"] == \
        first["attackers"][attacker]["method"]["final"]
    # the protected folder made again is another release: its runs start afresh
    shutil.rmtree(tmp_path / "work" / "protected")
    lines.clear()
    run_lab(setting, tmp_path / "work", log=lines.append)
    assert not any(line.endswith("(resumed)") for line in lines)


def test_a_row_may_leave_out_the_split_controls_and_add_them_later(tmp_path):
    from click.testing import CliRunner

    from mmguard.cli import main

    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    result = CliRunner().invoke(main, [
        "lab", "--dataset", "digits", "--kind", "pairs", "--method", "mem",
        "--set", "surrogates=rn-test", "--set", "rounds=1", "--set", "pgd_steps=2",
        "--set", "batch_size=8", "--set", "top_k=4", "--attacker", attacker, "--seeds", "0",
        "--limit", "16", "--out", str(tmp_path / "work"), "--no-split-controls",
        "--name", "ablation"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "work" / "lab.json").read_text())["rows"]["ablation"]
    assert set(row["attackers"][attacker]) == {"clean", "uniform", "method"}
    table_line = next(line for line in (tmp_path / "work" / "lab.md").read_text().splitlines()
                      if line.startswith("| ablation"))
    assert table_line.count("not run") == 2
    # the best variant's row: the same release, its method run resumed, the two controls added
    lines: list[str] = []
    full = run_lab(LabSetting(**{**row["setting"], "split_controls": True,
                                 "options": TINY, "attackers": (attacker,), "seeds": (0,)}),
                   tmp_path / "work", log=lines.append)
    assert set(full["attackers"][attacker]) == set(CONTROLS)
    assert [line.split(", seed")[0] for line in lines if line.endswith("(resumed)")] == [
        f"{attacker} on method"]


def test_a_release_is_audited_once_until_a_file_changes(tmp_path, monkeypatch):
    import mmguard.lab as lab

    dataset, _ = hold_out(load_builtin("digits", "train", "pairs"), 8, 0.0)
    folder = tmp_path / "uniform"
    protect_once(dataset, "random", {"seed": 0}, folder, 8 / 255, log=lambda line: None)
    audits = []
    real_audit = lab.audit_or_raise
    monkeypatch.setattr(lab, "audit_or_raise", lambda f: audits.append(f) or real_audit(f))
    first = audited_stealth(folder)
    assert audited_stealth(folder) == first and len(audits) == 0  # kept by protect_once
    assert first["max_linf_levels"] <= 8 and first["mean_psnr_db"] > 30
    # a file pushed over the budget after the audit is caught, not served from the cache
    png = sorted((folder / "images").rglob("*.png"))[0]
    pixels = read_png_uint8(png)
    pixels[:3] = 255 - pixels[:3]
    Image.fromarray(pixels[:3].permute(1, 2, 0).numpy()).save(png)
    with pytest.raises(MMGuardError, match="over the budget"):
        audited_stealth(folder)
    assert len(audits) == 1


def test_a_coarse_method_row_gets_a_uniform_control_on_the_same_grid(tmp_path):
    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    cache = ControlCache(tmp_path / "controls.json")
    plain = LabSetting(dataset="digits", kind="pairs", method="random", attackers=(attacker,),
                       seeds=(0,), limit=16)
    run_lab(plain, tmp_path / "a", log=lambda line: None, cache=cache)
    lines: list[str] = []
    coarse = dataclasses.replace(plain, options={"coarse": 4})
    run_lab(coarse, tmp_path / "b", log=lines.append, cache=cache)
    # the clean run is shared; per-pixel uniform noise is not this row's control
    assert [line.split(", seed")[0] for line in lines if "cached" in line] == [
        f"{attacker} on clean"]
    record = json.loads((tmp_path / "b" / "uniform" / "mmguard-run.json").read_text())
    assert record["config"]["coarse"] == 4
    # A fixed grid of cells, luma only: the control is drawn on the same grid.
    cells = dataclasses.replace(plain, options={"cells": 8, "gray_noise": True})
    assert uniform_options(cells) == {"seed": 0, "cells": 8, "gray_noise": True}


def test_robustness_rows_transform_every_set_and_keep_their_own_controls(tmp_path):
    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    recipe = _recipe(attacker, 3, "jpeg:75,grayscale")
    assert recipe.augment.spec == "jpeg:75,grayscale" and recipe.seed == 3
    assert _recipe("smolvlm-lite:lora:epochs=2", 0, "blur:1").augment.spec == "blur:1"
    assert _recipe(attacker, 0).augment is None
    cache = ControlCache(tmp_path / "controls.json")
    plain = LabSetting(dataset="digits", kind="pairs", method="random", attackers=(attacker,),
                       seeds=(0,), limit=16)
    run_lab(plain, tmp_path / "a", log=lambda line: None, cache=cache)
    lines: list[str] = []
    row = run_lab(dataclasses.replace(plain, augment="resize:0.5"), tmp_path / "a",
                  log=lines.append, cache=cache)
    # the clean and uniform runs of an un-transformed attacker are not this row's controls
    assert not any("cached" in line for line in lines)
    assert row["setting"]["augment"] == "resize:0.5"
    assert len(json.loads((tmp_path / "controls.json").read_text())) == 4
    assert lab_row_name(dataclasses.replace(plain, augment="resize:0.5")).endswith(
        "vs attacker resize:0.5")
    with pytest.raises(MMGuardError, match="sharpen"):
        run_lab(dataclasses.replace(plain, augment="sharpen"), tmp_path / "b",
                log=lambda line: None)


def test_rare_word_rows_strip_each_training_set_on_its_own_counts(tmp_path):
    image = torch.zeros(3, 4, 4)
    clean = ImageCaptionSet([image] * 3, [["a red cat"], ["a blue cat"], ["a red dog"]])
    method = ImageCaptionSet([image] * 3, [["a red cat zq"], ["a blue cat zq"], ["a red dog"]])
    setting = LabSetting(dataset="digits", kind="pairs", method="mem", strip_rare_words="2")
    lines: list[str] = []
    sets = attacker_sets(setting, {"clean": clean, "method": method}, lines.append)
    assert sets["clean"].captions == [["a red cat"], ["a cat"], ["a red"]]
    # "zq" is in two of the method set's captions, so that set keeps it
    assert sets["method"].captions == [["a red cat zq"], ["a cat zq"], ["a red"]]
    assert lines == ["clean: stripped 2 of 9 words; 2 of 3 texts changed",
                     "method: stripped 2 of 11 words; 2 of 3 texts changed"]
    assert attacker_sets(dataclasses.replace(setting, strip_rare_words=None),
                         {"clean": clean}, lines.append)["clean"] is clean

    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    plain = LabSetting(dataset="digits", kind="pairs", method="random", attackers=(attacker,),
                       seeds=(0,), limit=16)
    cache = ControlCache(tmp_path / "controls.json")
    run_lab(plain, tmp_path / "a", log=lambda line: None, cache=cache)
    lines.clear()
    stripping = dataclasses.replace(plain, strip_rare_words="0.5")
    run_lab(stripping, tmp_path / "a", log=lines.append, cache=cache)
    assert not any("cached" in line for line in lines)  # the plain row's controls differ
    assert [line.split(":")[0] for line in lines if "stripped" in line] == [
        "clean", "uniform", "method"]
    assert lab_row_name(stripping).endswith("stripping words in < 0.5 texts")
    with pytest.raises(MMGuardError, match="strip-rare-words"):
        run_lab(dataclasses.replace(plain, strip_rare_words="1"), tmp_path / "b",
                log=lambda line: None)


def test_lab_options_and_attackers_are_parsed_and_checked():
    assert parse_options("mem", ["pgd_steps=40", "surrogates=lit", "step_size=2/255",
                                 "natural_triggers=true"]) == {
        "pgd_steps": 40, "surrogates": ("lit",), "step_size": 2 / 255, "natural_triggers": True}
    with pytest.raises(MMGuardError, match="option of mem"):
        parse_options("mem", ["binding=bph"])
    # Values are checked as the command line checks them, before any work starts.
    assert parse_options("wrong-target", ["step_schedule=cosine"]) == {"step_schedule": "cosine"}
    with pytest.raises(MMGuardError, match="step_schedule='linear' is not one of constant, cosine"):
        parse_options("wrong-target", ["step_schedule=linear"])
    with pytest.raises(MMGuardError, match=r"pgd_steps=0 must lie in \[1, \]"):
        parse_options("wrong-target", ["pgd_steps=0"])
    # ...and so does the Python API, which never passes through click.
    with pytest.raises(MMGuardError, match=r"wrong-target: coarse=65 must lie in \[1, 64\]"):
        create_method("wrong-target", "pairs", coarse=65)
    with pytest.raises(MMGuardError, match="values='gauss' is not one of uniform, sign"):
        create_method("random", "pairs", values="gauss")
    assert create_method("wrong-target", "pairs", coarse=64).config.coarse == 64
    assert parse_attacker("lit:projection:epochs=5,lr=1e-3") == ("lit", "projection",
                                                                 {"epochs": 5, "lr": 1e-3})
    with pytest.raises(MMGuardError, match="MODEL:RECIPE"):
        parse_attacker("lit")


def test_an_attacker_spec_can_ask_for_batchnorm_statistics_read_on_the_test_images(monkeypatch):
    import mmguard.lab as lab

    asked = []
    real = lab.evaluate_retrieval

    def recording(model, test, **options):
        asked.append(options.get("test_batchnorm", False))
        return real(model, test, **options)

    monkeypatch.setattr(lab, "evaluate_retrieval", recording)
    torch.manual_seed(0)
    data = ImageCaptionSet([torch.rand(3, 32, 32) for _ in range(8)],
                           [[f"item number {i}"] for i in range(8)])
    for spec in ("rn-test:scratch:epochs=1,batch_size=8,test_batchnorm=1",
                 "rn-test:scratch:epochs=1,batch_size=8"):
        attack_once([spec], 0, data, data, every_epoch=True)
    assert asked == [True, False]


@pytest.fixture
def trainings(monkeypatch) -> list[int]:
    """One entry per attacker training the lab starts."""
    import mmguard.lab as lab

    started: list[int] = []
    real = lab.train_attacker

    def counting(*args, **kwargs):
        started.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lab, "train_attacker", counting)
    return started


def test_specs_differing_only_in_scoring_share_one_training_and_score_as_apart(trainings):
    torch.manual_seed(0)
    data = ImageCaptionSet([torch.rand(3, 32, 32) for _ in range(8)],
                           [[f"item number {i}"] for i in range(8)])
    adabn, plain = ("rn-test:scratch:epochs=2,batch_size=4,test_batchnorm=1",
                    "rn-test:scratch:batch_size=4,epochs=2")
    assert training_spec(adabn) == training_spec(plain) == "rn-test:scratch:batch_size=4,epochs=2"
    together = attack_once([adabn, plain], 0, data, data, every_epoch=True)
    assert len(trainings) == 1
    apart = {spec: attack_once([spec], 0, data, data, every_epoch=True)[spec]
             for spec in (adabn, plain)}
    # scoring one way leaves the model as it was for the other, and for the next epoch
    assert together == apart
    assert together[adabn]["epochs"] != together[plain]["epochs"]
    with pytest.raises(MMGuardError, match="train differently"):
        attack_once([plain, "rn-test:scratch:epochs=1,batch_size=4"], 0, data, data, True)


def test_a_row_trains_once_for_attackers_that_differ_only_in_scoring(tmp_path, trainings):
    plain = "rn-test:scratch:epochs=1,batch_size=8"
    adabn = plain + ",test_batchnorm=1"
    cache = ControlCache(tmp_path / "controls.json")
    setting = LabSetting(dataset="digits", kind="pairs", method="random",
                         attackers=(adabn, plain), seeds=(0,), limit=16)
    row = run_lab(setting, tmp_path / "a", log=lambda line: None, cache=cache)
    assert list(row["attackers"]) == [adabn, plain]
    assert len(trainings) == 3  # clean, uniform, method: one training each
    # the plain spec's controls were stored under its own key: a row with it alone reuses them
    lines: list[str] = []
    alone = run_lab(dataclasses.replace(setting, attackers=(plain,)), tmp_path / "a",
                    log=lines.append, cache=cache)
    assert len(trainings) == 3 and all(line.endswith(("(cached)", "(resumed)"))
                                       for line in lines)
    assert alone["attackers"][plain] == row["attackers"][plain]


# -- releases made per caption row ------------------------------------------------------------
needs_emoji_captions = pytest.mark.skipif(
    not (emoji_module.FONT.exists() and emoji_module.EMOJI_TEST.exists()
         and all(path.exists() for path in captions_module.CLDR_ANNOTATIONS)),
    reason="emoji font, emoji-test.txt or unicode-cldr-core not installed")
CAPTIONS_PER_IMAGE = (3, 2, 3, 1, 2)
PHRASINGS = ("{}", "the number {}", "{} written by hand")


def multi_caption_manifest(root: Path) -> Path:
    """Five real digit images with 3, 2, 3, 1 and 2 captions, rows interleaved (COCO-like)."""
    root.mkdir()
    records = load_builtin("digits", "train").records[:len(CAPTIONS_PER_IMAGE)]
    for record in records:
        Image.fromarray(load_image_uint8(record.image, "o").permute(1, 2, 0).numpy()).save(
            root / record.image.key)
    rows = [{"image": record.image.key,
             "caption": PHRASINGS[k].format(record.captions[0]) + f", image {index}"}
            for k in range(len(PHRASINGS))
            for index, (record, count) in enumerate(zip(records, CAPTIONS_PER_IMAGE,
                                                        strict=True)) if k < count]
    return write_manifest(root, rows)


@pytest.fixture(scope="module")
def caption_release(tmp_path_factory):
    """The manifest, its MEM release per caption row and its uniform-noise release."""
    root = tmp_path_factory.mktemp("captions")
    dataset = read_dataset(multi_caption_manifest(root / "photos"))
    protect_once(dataset, "mem", {**TINY, "noise_per": "caption", "trigger_init": "random"},
                 root / "protected", 8 / 255, log=lambda line: None)
    protect_once(dataset, "random", {"seed": 0}, root / "uniform", 8 / 255,
                 log=lambda line: None)
    return dataset, root


def _rows(dataset, root: Path):
    """Per manifest row, worked out from the files: (original pixels, clean caption, the
    row's protected copy, its released caption, the image's uniform-noise copy)."""
    released = read_dataset(root / "protected" / "manifest.csv").records
    seen: dict[str, int] = {}
    rows = []
    for record, published in zip(dataset.records, released, strict=True):
        stem = Path(record.image.key).stem
        k = seen[stem] = seen.get(stem, -1) + 1
        rows.append((to_float(load_image_uint8(record.image, "o")), record.captions[0],
                     to_float(read_png_uint8(root / f"protected/images/{stem}__c{k}.png")),
                     published.captions[0],
                     to_float(read_png_uint8(root / f"uniform/images/{stem}.png"))))
    return rows


def test_caption_mode_controls_are_aligned_row_by_row(caption_release):
    dataset, root = caption_release
    setting = LabSetting(dataset="digits", kind="pairs", method="mem", attackers=())
    sets = training_sets(setting, dataset, root / "protected", root / "uniform")
    rows = _rows(dataset, root)
    assert len(rows) == sum(CAPTIONS_PER_IMAGE) == 11
    assert set(sets) == {"clean", "uniform", "method", "noise only", "trigger only"}
    for name, data in sets.items():
        assert len(data.images) == len(data.captions) == len(rows), name
    for r, (original, caption, copy, triggered, uniform) in enumerate(rows):
        assert triggered.endswith(" " + caption) and triggered != caption
        expected = {"clean": (original, caption), "uniform": (uniform, caption),
                    "method": (copy, triggered), "noise only": (copy, caption),
                    "trigger only": (original, triggered)}
        for name, (image, text) in expected.items():
            assert torch.equal(sets[name].images[r], image), (name, r)
            assert sets[name].captions[r] == [text], (name, r)
    # every row has its own noise; the uniform noise is drawn once per image
    assert len({tuple(copy.flatten().tolist()) for *_, copy, _, _ in rows}) == len(rows)
    assert len({tuple(u.flatten().tolist()) for *_, u in rows}) == len(CAPTIONS_PER_IMAGE)


def test_hold_out_never_puts_one_image_on_both_sides(caption_release):
    dataset, _ = caption_release
    keys = list(dataset.records_by_image())
    train, held = hold_out(dataset, 4, 0.5)
    # held out: the two of the first four images whose keys hash lowest, in source order
    lowest = sorted(keys[:4], key=lambda key: hashlib.sha1(key.encode()).hexdigest())[:2]
    assert list(held.records_by_image()) == [key for key in keys[:4] if key in lowest]
    assert list(train.records_by_image()) == [key for key in keys[:4] if key not in lowest]
    for part in (train, held):  # every caption row of its images, in manifest order
        wanted = set(part.records_by_image())
        assert part.records == [r for r in dataset.records if r.image.key in wanted]
    # held out, each image is scored with all of its captions together
    assert [len(c) for c in load_pairs(held).captions] == [
        count for key, count in zip(keys, CAPTIONS_PER_IMAGE, strict=False) if key in lowest]


def test_mix_clean_swaps_whole_images_of_a_caption_mode_release(caption_release):
    dataset, root = caption_release
    protected_dataset = read_dataset(root / "protected" / "manifest.csv")
    protected = load_pairs(protected_dataset)
    rows = _rows(dataset, root)
    for r, (_, _, copy, triggered, _) in enumerate(rows):
        assert torch.equal(protected.images[r], copy) and protected.captions[r] == [triggered]

    everything = mix_clean(protected, protected_dataset, dataset, 1.0, seed=0)
    for r, (original, caption, *_) in enumerate(rows):
        assert torch.equal(everything.images[r], original) and everything.captions[r] == [caption]

    part = mix_clean(protected, protected_dataset, dataset, 0.4, seed=0)
    swapped = {dataset.records[r].image.key for r, (original, caption, *_) in enumerate(rows)
               if part.captions[r] == [caption]}
    assert len(swapped) == 2  # two of the five images, with every one of their rows
    for r, (original, caption, copy, triggered, _) in enumerate(rows):
        image, text = (original, caption) if dataset.records[r].image.key in swapped else \
            (copy, triggered)
        assert torch.equal(part.images[r], image) and part.captions[r] == [text]

    report = evaluate_attacker(AttackerEvaluation(
        train=str(root / "protected" / "manifest.csv"), test=str(root / "photos/manifest.csv"),
        attacker="rn-test", epochs=1, batch_size=4,
        mix_clean=f"{root / 'photos/manifest.csv'}:0.5"), log=lambda line: None)
    assert report.report["protected"]["runs"]


@needs_emoji_captions
def test_lab_row_on_emoji_captions_released_per_caption(tmp_path):
    attacker = "rn-test:scratch:epochs=1,batch_size=8"
    setting = LabSetting(dataset="emoji-captions", kind="pairs", method="mem",
                         options={**TINY, "noise_per": "caption"}, attackers=(attacker,),
                         seeds=(0,), limit=5, holdout=0.4)
    train_part, held_part = split_training(setting)
    assert not set(train_part.records_by_image()) & set(held_part.records_by_image())
    cache = ControlCache(tmp_path / "controls.json")
    row = run_lab(setting, tmp_path / "work", log=lambda line: None, cache=cache)
    assert row["release_per"] == "caption"
    assert row["train_images"] == 3 and row["test_images"] == 2
    assert row["train_items"] == len(train_part.records) > 2 * 3  # one item per caption row
    assert set(row["attackers"][attacker]) == {"clean", "uniform", "method", "noise only",
                                               "trigger only"}
    # per-row clean and uniform runs are not the per-image ones of the same slice
    stored = json.loads((tmp_path / "controls.json").read_text())
    assert len(stored) == 2 and all("per caption row" in key for key in stored)


def test_lab_scores_an_lvlm_attacker_on_triples_after_every_epoch(tmp_path):
    attacker = "lvlm-test:lora:epochs=2,batch_size=4"
    setting = LabSetting(dataset="fashion-mnist", kind="triples", method="random",
                         attackers=(attacker,), seeds=(0,), limit=12, holdout=0.25)
    row = run_lab(setting, tmp_path / "work", log=lambda line: None)
    assert row["train_images"] == 9 and row["test_images"] == 3
    results = row["attackers"][attacker]
    assert set(results) == {"clean", "uniform", "method"}
    for control in results.values():
        epochs = control["epochs"][0]
        assert len(epochs) == 2 and all(0 <= e["exact_match"] <= 100 for e in epochs)
        assert control["best"]["exact_match"]["mean"] == max(e["exact_match"] for e in epochs)
