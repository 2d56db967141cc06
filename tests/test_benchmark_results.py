"""The benchmarks' results file: saving merges rows written by another process."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import results_file

ROOT = Path(__file__).resolve().parent.parent


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
    # rows of one slice and attacker must share the clean and uniform attacker runs (same
    # cache keys)
    by_slice: dict[tuple[str, str], set[str]] = {}
    for setting in ROWS.values():
        spec = setting.attackers[0]
        by_slice.setdefault((setting.dataset, spec.split(":")[0]), set()).add(
            ControlCache.key(setting, "clean", spec, 0, setting.kind == "pairs"))
    assert {name: len(keys) for name, keys in by_slice.items()} == {
        ("fashion-mnist", "smolvlm-lite"): 1, ("fashion-mnist", "smolvlm-lite-c"): 1,
        ("emoji-categories", "smolvlm-lite"): 1, ("emoji-captions", "rn-tiny"): 1}
    # and those runs are already in the committed cache, so a row trains only on its release
    cached = json.loads((ROOT / "benchmarks" / "results" / "lab-controls.json").read_text())
    missing = [key for keys in by_slice.values() for key in keys if key not in cached]
    assert missing == []


def _record(folder, status):
    from mmguard.data.release import Budget, RecordedInput, RunRecord, write_run_record

    write_run_record(folder, RunRecord(RecordedInput("fashion-mnist", "builtin", "triples"),
                                       Budget(8 / 255, 8, 5), items=[], status=status))


def _release(folder, status="complete"):
    (folder / ".mmguard").mkdir(parents=True)
    (folder / ".mmguard" / "journal.jsonl").write_text("work state\n")
    (folder / "images").mkdir()
    (folder / "images" / "a.png").write_bytes(b"png")
    _record(folder, status)


def test_a_fidelity_row_keeps_its_finished_release_and_runs_for_a_new_machine(tmp_path):
    from benchmarks.fidelity import ROWS, RUNS, keep, restore

    work, kept = tmp_path / "work", tmp_path / "kept"
    setting = ROWS["no-binding"]
    _release(work / "protected", status="running")
    keep(work, kept, setting)
    assert not kept.exists()  # an unfinished release is not kept
    _record(work / "protected", "complete")
    (work / RUNS).write_text(json.dumps({"run 1": {"final": 1}}))
    keep(work, kept, setting)
    assert (kept / "protected" / "images" / "a.png").read_bytes() == b"png"
    assert not (kept / "protected" / ".mmguard").exists()  # work state stays behind
    (work / RUNS).write_text(json.dumps({"run 1": {"final": 1}, "run 2": {"final": 2}}))
    keep(work, kept, setting)
    assert set(json.loads((kept / RUNS).read_text())) == {"run 1", "run 2"}

    fresh = tmp_path / "fresh"  # the work folder of a new machine
    assert not restore(fresh, kept, ROWS["paper-min"])  # kept for another row's setting
    assert not fresh.exists()
    assert restore(fresh, kept, setting)
    assert (fresh / "protected" / "mmguard-run.json").read_bytes() == \
        (work / "protected" / "mmguard-run.json").read_bytes()  # the release's identity
    assert set(json.loads((fresh / RUNS).read_text())) == {"run 1", "run 2"}


def test_a_finished_fidelity_row_runs_again_only_when_its_setting_changed():
    import dataclasses

    from benchmarks.fidelity import ROWS, _unchanged

    setting = ROWS["paper"]
    written = json.loads(json.dumps(dataclasses.asdict(setting)))
    assert _unchanged(written, setting)
    # a row written before a field existed had that field's default
    assert _unchanged({k: v for k, v in written.items() if k != "strip_rare_words"}, setting)
    assert not _unchanged(written, dataclasses.replace(setting, split_controls=False))
    assert not _unchanged({**written, "options": {**written["options"], "inner_steps": 0}},
                          setting)
