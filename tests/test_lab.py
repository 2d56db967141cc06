"""The efficacy lab: every control is built from the right images and texts, and scored."""

from __future__ import annotations

import json

import pytest

from mmguard.errors import MMGuardError
from mmguard.lab import (
    ControlCache,
    LabSetting,
    append_row,
    parse_attacker,
    run_lab,
    training_sets,
)
from mmguard.protect.registry import parse_options

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


def test_controls_swap_images_and_texts_of_the_protected_and_clean_sets(tmp_path):
    setting = LabSetting(dataset="digits", kind="pairs", method="mem", options=TINY,
                         attackers=(), seeds=(0,), limit=12)
    run_lab(setting, tmp_path / "work", log=lambda line: None)
    from mmguard.lab import split_training

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


def test_lab_options_and_attackers_are_parsed_and_checked():
    assert parse_options("mem", ["pgd_steps=40", "surrogates=lit", "step_size=2/255",
                                 "natural_triggers=true"]) == {
        "pgd_steps": 40, "surrogates": ("lit",), "step_size": 2 / 255, "natural_triggers": True}
    with pytest.raises(MMGuardError, match="option of mem"):
        parse_options("mem", ["binding=bph"])
    assert parse_attacker("lit:projection:epochs=5,lr=1e-3") == ("lit", "projection",
                                                                 {"epochs": 5, "lr": 1e-3})
    with pytest.raises(MMGuardError, match="MODEL:RECIPE"):
        parse_attacker("lit")
