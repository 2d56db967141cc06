"""The released dataset's format: run record types, its one reader and writer, file paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmguard.data.builtin import load_builtin
from mmguard.data.release import (
    RUN_RECORD,
    Budget,
    RecordedInput,
    ReleasedItem,
    RunRecord,
    output_image_paths,
    per_caption_images,
    read_run_record,
    write_run_record,
)
from mmguard.data.resolve import DatasetNotFound, resolve_dataset
from mmguard.errors import MMGuardError
from tests.conftest import write_manifest


def _record() -> RunRecord:
    return RunRecord(
        input=RecordedInput("builtin:emoji/train", "builtin", "pairs"),
        budget=Budget(8 / 255, 8, 3),
        items=[ReleasedItem("a.png", "images/a.png", 8, 40.1234567, "zq7 xx", "end"),
               ReleasedItem("b.png", "images/b.png", 0, float("inf"), None, None, alpha=True)],
        config={"method": "mem", "eps": 8 / 255, "surrogates": ["rn-tiny"]},
        skipped=[{"key": "c.png", "item": "row 3", "reason": "no caption"}])


def test_run_record_round_trips_through_its_writer_and_reader(tmp_path: Path):
    write_run_record(tmp_path, _record())
    record = read_run_record(tmp_path)
    assert record.method == "mem" and record.surrogates == ("rn-tiny",)
    assert record.budget == Budget(8 / 255, 8, 3)
    assert record.input.kind == "pairs"
    first, second = record.items
    assert (first.trigger, first.trigger_position, first.psnr_db) == ("zq7 xx", "end", 40.123)
    assert second.psnr_db == float("inf") and second.alpha and second.trigger is None
    assert record.triggers_by_file() == {"images/a.png": ("zq7 xx", "end")}
    assert record.max_linf_levels == 8 and record.mean_psnr_db == 40.123
    assert not list(tmp_path.glob(".tmp-*"))


def test_run_record_keeps_the_keys_readers_of_earlier_versions_use(tmp_path: Path):
    write_run_record(tmp_path, _record())
    data = json.loads((tmp_path / RUN_RECORD).read_text())
    assert list(data) == ["mmguard_version", "status", "error", "input", "config", "budgets",
                          "versions", "platform", "history", "counts", "summary",
                          "optimisation", "skipped", "items"]
    assert data["budgets"] == {"eps": 8 / 255, "eps_levels": 8, "trigger_len": 3}
    assert data["counts"] == {"finished": 2, "skipped": 1}
    assert data["summary"] == {"max_linf_levels": 8, "mean_psnr_db": 40.123}
    # Items keep their form; the position and alpha flag are added only where they apply.
    assert data["items"][0] == {"key": "a.png", "file": "images/a.png", "linf": 8 / 255,
                                "linf_levels": 8, "psnr_db": 40.123, "trigger": "zq7 xx",
                                "trigger_position": "end"}
    assert data["items"][1] == {"key": "b.png", "file": "images/b.png", "linf": 0.0,
                                "linf_levels": 0, "psnr_db": None, "trigger": None,
                                "alpha": True}


def test_an_item_of_an_earlier_record_reads_without_position(tmp_path: Path):
    item = ReleasedItem.from_json({"key": "a", "file": "images/a.png", "linf": 0.01,
                                   "linf_levels": 2, "psnr_db": 45.0, "trigger": "xx"})
    assert item == ReleasedItem("a", "images/a.png", 2, 45.0, "xx", None, False)


def test_reader_names_what_is_wrong_with_a_record(tmp_path: Path):
    with pytest.raises(MMGuardError, match="has no mmguard-run.json"):
        read_run_record(tmp_path)
    path = tmp_path / RUN_RECORD
    path.write_text("{not json")
    with pytest.raises(MMGuardError, match="not readable JSON"):
        read_run_record(tmp_path)
    path.write_text('{"items": []}')
    with pytest.raises(MMGuardError, match=r"not an mmguard run record \(no input, budgets\)"):
        read_run_record(tmp_path)
    write_run_record(tmp_path, _record())
    data = json.loads(path.read_text())
    del data["items"][0]["linf_levels"]
    path.write_text(json.dumps(data))
    with pytest.raises(MMGuardError, match="incomplete or damaged run record.*linf_levels"):
        read_run_record(tmp_path)
    data["items"] = "all of them"
    path.write_text(json.dumps(data))
    with pytest.raises(MMGuardError, match="incomplete or damaged"):
        read_run_record(tmp_path)


def test_output_paths_drop_the_shared_folder_and_become_png(tmp_path: Path):
    for name in ("img/a/x.jpg", "img/b.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    manifest = write_manifest(tmp_path, [{"image": "img/a/x.jpg", "caption": "x"},
                                         {"image": "img/b.webp", "caption": "b"}])
    paths = output_image_paths(resolve_dataset(manifest))
    assert paths == {"img/a/x.jpg": "images/a/x.png", "img/b.webp": "images/b.png"}


def test_per_caption_images_give_every_caption_row_its_own_key(tmp_path: Path):
    (tmp_path / "img").mkdir()
    rows = [{"image": "img/a.jpg", "caption": ["one", "two"]},
            {"image": "img/b.png", "caption": "three"},
            {"image": "img/a.jpg", "caption": "four"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = resolve_dataset(tmp_path / "m.jsonl")

    split = per_caption_images(dataset)

    assert [(r.image.key, r.captions) for r in split.records] == [
        ("img/a__c0.jpg", ("one",)), ("img/a__c1.jpg", ("two",)),
        ("img/b__c0.png", ("three",)), ("img/a__c2.jpg", ("four",))]
    # Same files read, same rows mirrored; the input dataset is left as it was.
    assert {r.image.path for r in split.records} == {tmp_path / "img/a.jpg", tmp_path / "img/b.png"}
    assert split.records[1].raw is dataset.records[0].raw
    assert (split.source, split.fmt, split.root) == (dataset.source, dataset.fmt, dataset.root)
    assert [r.image.key for r in dataset.records] == ["img/a.jpg", "img/b.png", "img/a.jpg"]
    assert list(output_image_paths(split).values()) == [
        "images/a__c0.png", "images/a__c1.png", "images/b__c0.png", "images/a__c2.png"]


def test_resolver_reads_manifests_builtins_and_the_names_run_records_write(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"")
    manifest = write_manifest(tmp_path, [{"image": "x.png", "prompt": "what?",
                                          "response": "x"}])
    assert resolve_dataset(manifest).kind == "triples"  # a manifest says what it holds
    assert resolve_dataset(str(manifest), "pairs").source == str(manifest)
    by_name = resolve_dataset("digits:test", "triples")
    assert by_name.kind == "triples"
    recorded = resolve_dataset(by_name.source, "triples")  # "builtin:digits/test"
    assert recorded.source == by_name.source
    assert len(recorded.records) == len(load_builtin("digits", "test", "triples").records)
    with pytest.raises(DatasetNotFound, match="input not found.*neither an existing manifest"):
        resolve_dataset(tmp_path / "missing.csv")
    with pytest.raises(DatasetNotFound):
        resolve_dataset("nosuchset:train")
    with pytest.raises(MMGuardError, match="unknown split"):
        resolve_dataset("digits:validation")
