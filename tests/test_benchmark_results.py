"""The benchmarks' results file: saving merges rows written by another process."""

from __future__ import annotations

import json

from benchmarks import results_file


def test_saves_from_two_processes_keep_both_rows(tmp_path):
    path = tmp_path / "results.json"
    tables = []
    first, second = results_file.load_results(path), results_file.load_results(path)
    first["rows"]["a"] = {"value": 1}
    results_file.save_results(path, first, tables.append)
    second["rows"]["b"] = {"value": 2}  # loaded before `a` was saved
    results_file.save_results(path, second, tables.append)
    on_disk = json.loads(path.read_text())
    assert on_disk["rows"] == {"a": {"value": 1}, "b": {"value": 2}}
    assert set(tables[-1]["rows"]) == {"a", "b"}  # the table is written from the merged rows
    # A row this process holds wins over the disk's copy of it.
    second["rows"]["a"] = {"value": 3}
    results_file.save_results(path, second, tables.append)
    assert json.loads(path.read_text())["rows"]["a"] == {"value": 3}
    assert not list(tmp_path.glob("*.partial"))


def test_forget_results_starts_from_nothing(tmp_path):
    path = tmp_path / "results.json"
    results_file.save_results(path, {"rows": {"old": {}}}, lambda _: None)
    fresh = results_file.forget_results(path)
    fresh["rows"]["new"] = {}
    results_file.save_results(path, fresh, lambda _: None)
    assert set(json.loads(path.read_text())["rows"]) == {"new"}


def test_every_fidelity_row_is_a_valid_lab_setting_sharing_its_slice_controls():
    from benchmarks.fidelity import ROWS
    from mmguard.lab import ControlCache
    from mmguard.protect.registry import create_method

    for setting in ROWS.values():
        create_method(setting.method, setting.kind, eps=setting.eps, **setting.options)
    # rows of one slice must share the clean and uniform attacker runs (same cache keys)
    by_slice: dict[str, set[str]] = {}
    for setting in ROWS.values():
        spec = setting.attackers[0]
        by_slice.setdefault(setting.dataset, set()).add(
            ControlCache.key(setting, "clean", spec, 0, setting.kind == "pairs"))
    assert {name: len(keys) for name, keys in by_slice.items()} == {
        "fashion-mnist": 1, "emoji-captions": 1}
