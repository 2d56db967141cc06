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
