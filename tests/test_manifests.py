"""Reading CSV/JSONL/LLaVA/Hugging Face inputs and writing their mirrors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmguard.data.images import load_image_uint8
from mmguard.data.records import PairRecord, TripleRecord
from mmguard.data.sources import fingerprint, mirror_manifest_name, read_dataset, write_mirror
from mmguard.errors import MMGuardError


def write_csv_rows(path: Path, header: list[str], rows: list[list[str]],
                   encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv_dicts(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def write_jsonl_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def triggered(record):
    """The record with a trigger word before its (first) text, as protect would do."""
    if isinstance(record, PairRecord):
        return record.with_texts(tuple("TRIG " + caption for caption in record.captions))
    return record.with_texts(("TRIG " + record.prompt,))


# --- CSV ---------------------------------------------------------------------------------


def test_csv_pairs_grouped_by_image(tmp_path: Path):
    path = write_csv_rows(tmp_path / "manifest.csv", ["image", "caption", "source"], [
        ["a.png", "a cat", "web"],
        ["sub/b.png", "a dog", "book"],
        ["a.png", "the cat again", "web"],
        ["./sub/b.png", "the dog again", "book"],
    ])

    dataset = read_dataset(path)

    assert dataset.kind == "pairs"
    assert dataset.fmt == "csv"
    assert dataset.root == tmp_path
    assert dataset.rejected == []
    assert all(isinstance(record, PairRecord) for record in dataset.records)
    assert [record.captions for record in dataset.records] == [
        ("a cat",), ("a dog",), ("the cat again",), ("the dog again",)]
    assert dataset.records_by_image() == {"a.png": [0, 2], "sub/b.png": [1, 3]}
    assert [ref.key for ref in dataset.images()] == ["a.png", "sub/b.png"]
    assert dataset.records[1].image.path == tmp_path / "sub" / "b.png"
    assert [record.where for record in dataset.records] == [
        "manifest.csv line 2", "manifest.csv line 3", "manifest.csv line 4",
        "manifest.csv line 5"]


def test_csv_mirror_keeps_extra_columns(tmp_path: Path):
    path = write_csv_rows(tmp_path / "manifest.csv", ["id", "image", "caption", "source"], [
        ["1", "a.png", "a cat", "web"],
        ["2", "b.png", "a dog", "book"],
        ["3", "a.png", "the cat again", "scan"],
    ])
    dataset = read_dataset(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / mirror_manifest_name(dataset)
    assert out.name == "manifest.csv"

    rows = [(triggered(record), f"images/{record.image.key}") for record in dataset.records]
    write_mirror(out, dataset, rows)

    columns, written = read_csv_dicts(out)
    assert columns == ["id", "image", "caption", "source"]
    assert written == [
        {"id": "1", "image": "images/a.png", "caption": "TRIG a cat", "source": "web"},
        {"id": "2", "image": "images/b.png", "caption": "TRIG a dog", "source": "book"},
        {"id": "3", "image": "images/a.png", "caption": "TRIG the cat again", "source": "scan"},
    ]


def test_csv_bom_and_non_ascii_survive(tmp_path: Path):
    captions = ["un café crème", "猫がベッドで寝ている", "emoji 😀 and ñ", "line\u2028separator"]
    path = write_csv_rows(tmp_path / "manifest.csv", ["image", "caption"],
                          [[f"{i}.png", caption] for i, caption in enumerate(captions)],
                          encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")

    dataset = read_dataset(path)

    assert dataset.meta["columns"] == ["image", "caption"]  # no BOM glued to "image"
    assert [record.image.key for record in dataset.records] == ["0.png", "1.png", "2.png",
                                                                "3.png"]
    assert [record.captions[0] for record in dataset.records] == captions

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    write_mirror(out_dir / "manifest.csv", dataset,
                 [(record, record.image.key) for record in dataset.records])
    again = read_dataset(out_dir / "manifest.csv")
    assert [record.captions[0] for record in again.records] == captions


def test_csv_unsafe_and_missing_paths_rejected(tmp_path: Path):
    path = write_csv_rows(tmp_path / "manifest.csv", ["image", "caption"], [
        ["good1.png", "fine"],
        ["../../etc/passwd", "escape"],
        ["/etc/passwd", "absolute"],
        ["C:\\x.png", "windows drive"],
        ["http://example.com/cat.png", "remote"],
        ["", "no image"],
        ["sub/good2.png", "also fine"],
        ["sub/../../outside.png", "sneaky escape"],
    ])

    dataset = read_dataset(path)

    assert [record.image.key for record in dataset.records] == ["good1.png", "sub/good2.png"]
    assert [record.captions[0] for record in dataset.records] == ["fine", "also fine"]
    found = {rejected.where: rejected.reason for rejected in dataset.rejected}
    expected = {
        "manifest.csv line 3": ("../../etc/passwd", "outside"),
        "manifest.csv line 4": ("/etc/passwd", "absolute"),
        "manifest.csv line 5": ("C:\\\\x.png", "absolute"),  # repr of the value
        "manifest.csv line 6": ("http://example.com/cat.png", "URL"),
        "manifest.csv line 7": ("", "no image path"),
        "manifest.csv line 9": ("sub/../../outside.png", "outside"),
    }
    assert set(found) == set(expected)
    for where, (value, problem) in expected.items():
        assert problem in found[where], (where, found[where])
        assert value in found[where], (where, found[where])


def test_csv_triples(tmp_path: Path):
    path = write_csv_rows(tmp_path / "qa.csv", ["image", "prompt", "response", "split"], [
        ["a.png", "What is shown?", "A cat.", "train"],
        ["a.png", "What colour is it?", "Black.", "train"],
        ["b.png", "Count the dogs.", "Two.", "val"],
    ])

    dataset = read_dataset(path)

    assert dataset.kind == "triples"
    assert all(isinstance(record, TripleRecord) for record in dataset.records)
    assert [(r.image.key, r.prompt, r.response) for r in dataset.records] == [
        ("a.png", "What is shown?", "A cat."),
        ("a.png", "What colour is it?", "Black."),
        ("b.png", "Count the dogs.", "Two."),
    ]
    assert dataset.records_by_image() == {"a.png": [0, 1], "b.png": [2]}

    out = tmp_path / "out.csv"
    write_mirror(out, dataset, [(triggered(r), "p/" + r.image.key) for r in dataset.records])
    columns, written = read_csv_dicts(out)
    assert columns == ["image", "prompt", "response", "split"]
    assert written[2] == {"image": "p/b.png", "prompt": "TRIG Count the dogs.",
                          "response": "Two.", "split": "val"}


def test_csv_without_known_columns_lists_what_it_found(tmp_path: Path):
    path = write_csv_rows(tmp_path / "manifest.csv", ["picture", "text"], [["a.png", "x"]])
    with pytest.raises(MMGuardError) as info:
        read_dataset(path)
    message = str(info.value)
    assert "picture" in message
    assert "text" in message
    assert "image,caption" in message


# --- JSONL -------------------------------------------------------------------------------


def test_jsonl_caption_list_and_invalid_line(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"image": "a.png", "caption": ["one", "two", "three"], "lang": "en"}) + "\n"
        + "{not json at all\n"
        + "\n"
        + json.dumps({"image": "b.png", "caption": "single"}) + "\n"
        + json.dumps(["a", "list"]) + "\n",
        encoding="utf-8")

    dataset = read_dataset(path)

    assert dataset.kind == "pairs"
    assert dataset.fmt == "jsonl"
    assert [record.captions for record in dataset.records] == [("one", "two", "three"),
                                                               ("single",)]
    assert [record.where for record in dataset.records] == ["data.jsonl line 1",
                                                            "data.jsonl line 4"]
    reasons = {rejected.where: rejected.reason for rejected in dataset.rejected}
    assert set(reasons) == {"data.jsonl line 2", "data.jsonl line 5"}
    assert "invalid JSON" in reasons["data.jsonl line 2"]
    assert "JSON object" in reasons["data.jsonl line 5"]

    out = tmp_path / "out" / "data.jsonl"
    out.parent.mkdir()
    write_mirror(out, dataset, [(triggered(r), "p/" + r.image.key) for r in dataset.records])
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == [
        {"image": "p/a.png", "caption": ["TRIG one", "TRIG two", "TRIG three"], "lang": "en"},
        {"image": "p/b.png", "caption": "TRIG single"},
    ]


def test_jsonl_triples(tmp_path: Path):
    path = write_jsonl_rows(tmp_path / "qa.jsonl", [
        {"image": "a.png", "prompt": "What?", "response": "A cat."},
        {"image": "../a.png", "prompt": "Where?", "response": "Outside."},
    ])
    dataset = read_dataset(path)
    assert dataset.kind == "triples"
    assert [(r.prompt, r.response) for r in dataset.records] == [("What?", "A cat.")]
    assert [r.where for r in dataset.rejected] == ["qa.jsonl line 2"]


def test_jsonl_unicode_line_separators_round_trip(tmp_path: Path):
    # U+2028, U+2029 and U+0085 are legal, unescaped characters inside JSON strings, and
    # the mirror writer emits them raw (ensure_ascii=False). A JSONL line ends only at
    # "\n", so each of these rows is still one record, in the input and in the mirror.
    captions = ["first\u2028second", "para\u2029graph", "next\x85line", "café 😀"]
    path = write_jsonl_rows(tmp_path / "in.jsonl",
                            [{"image": f"{i}.png", "caption": c} for i, c in enumerate(captions)])

    dataset = read_dataset(path)
    assert dataset.rejected == []
    assert [record.captions[0] for record in dataset.records] == captions

    out = tmp_path / "out" / "in.jsonl"
    out.parent.mkdir()
    write_mirror(out, dataset, [(record, record.image.key) for record in dataset.records])
    again = read_dataset(out)
    assert again.rejected == []
    assert [record.captions[0] for record in again.records] == captions


# --- LLaVA -------------------------------------------------------------------------------

LLAVA_ENTRIES = [
    {"id": "a", "image": "coco/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat."}]},
    {"id": "b", "image": "coco/b.jpg", "conversations": [
        {"from": "human", "value": "Describe the picture.\n<image>"},
        {"from": "gpt", "value": "A dog on grass."}]},
    {"id": "c", "image": "coco/c.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the car?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is it parked?"},
        {"from": "gpt", "value": "Yes."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "Tell me a joke."},
        {"from": "gpt", "value": "No."}]},
]


def write_llava(tmp_path: Path, entries=LLAVA_ENTRIES) -> Path:
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_llava_read(tmp_path: Path):
    dataset = read_dataset(write_llava(tmp_path))

    assert dataset.kind == "triples"
    assert dataset.fmt == "llava"
    assert dataset.rejected == []
    assert all(isinstance(record, TripleRecord) for record in dataset.records)
    assert [(r.image.key, r.prompt, r.response) for r in dataset.records] == [
        ("coco/a.jpg", "What is this?", "A cat."),
        ("coco/b.jpg", "Describe the picture.", "A dog on grass."),
        ("coco/c.jpg", "What colour is the car?", "Red."),
        ("coco/c.jpg", "Is it parked?", "Yes."),
    ]
    assert all("<image>" not in record.prompt for record in dataset.records)
    assert dataset.records_by_image() == {"coco/a.jpg": [0], "coco/b.jpg": [1],
                                          "coco/c.jpg": [2, 3]}
    assert dataset.records[0].image.path == tmp_path / "coco" / "a.jpg"
    assert mirror_manifest_name(dataset) == "conversations.json"


def test_llava_mirror_keeps_image_token_and_text_only_entries(tmp_path: Path):
    dataset = read_dataset(write_llava(tmp_path))
    rows = [(triggered(r), f"protected/{r.image.key[5:-4]}.png") for r in dataset.records]
    out = tmp_path / "out.json"

    write_mirror(out, dataset, rows)

    written = json.loads(out.read_text(encoding="utf-8"))
    assert [entry["id"] for entry in written] == ["a", "b", "c", "text"]
    by_id = {entry["id"]: entry for entry in written}
    assert by_id["a"]["image"] == "protected/a.png"
    assert by_id["a"]["conversations"][0]["value"] == "<image>\nTRIG What is this?"
    assert by_id["a"]["conversations"][1] == {"from": "gpt", "value": "A cat."}
    assert by_id["b"]["conversations"][0]["value"] == "TRIG Describe the picture.\n<image>"
    assert by_id["c"]["image"] == "protected/c.png"
    assert [turn["value"] for turn in by_id["c"]["conversations"]] == [
        "<image>\nTRIG What colour is the car?", "Red.", "TRIG Is it parked?", "Yes."]
    assert by_id["text"] == LLAVA_ENTRIES[3]
    # The input entries themselves are not modified.
    assert dataset.meta["entries"][0]["conversations"][0]["value"] == "<image>\nWhat is this?"

    # The mirror is itself a readable LLaVA file with the triggered prompts.
    again = read_dataset(out)
    assert [r.prompt for r in again.records] == [
        "TRIG What is this?", "TRIG Describe the picture.", "TRIG What colour is the car?",
        "TRIG Is it parked?"]


def test_llava_mirror_drops_partly_protected_entries(tmp_path: Path):
    dataset = read_dataset(write_llava(tmp_path))
    rows = [(triggered(r), r.image.key) for r in dataset.records]
    del rows[3]  # the second turn of entry "c" failed

    out = tmp_path / "out.json"
    write_mirror(out, dataset, rows)

    written = json.loads(out.read_text(encoding="utf-8"))
    assert [entry["id"] for entry in written] == ["a", "b", "text"]


def test_llava_mirror_keeps_image_token_when_prompt_is_inside_it(tmp_path: Path):
    # The prompt "image" is also a substring of the "<image>" token; the trigger must go
    # into the prompt, not into the token.
    entries = [{"id": "x", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nimage"}, {"from": "gpt", "value": "a photo"}]}]
    dataset = read_dataset(write_llava(tmp_path, entries))
    assert [r.prompt for r in dataset.records] == ["image"]

    out = tmp_path / "out.json"
    write_mirror(out, dataset, [(triggered(r), "x.png") for r in dataset.records])

    written = json.loads(out.read_text(encoding="utf-8"))
    assert written[0]["conversations"][0]["value"] == "<image>\nTRIG image"


def test_llava_bad_entries_rejected(tmp_path: Path):
    entries = [
        {"id": "ok", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "abs", "image": "/abs.png", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "noturns", "image": "n.png", "conversations": [
            {"from": "gpt", "value": "A"}]},
    ]
    dataset = read_dataset(write_llava(tmp_path, entries))
    assert [r.image.key for r in dataset.records] == ["ok.png"]
    reasons = {rejected.where: rejected.reason for rejected in dataset.rejected}
    assert set(reasons) == {"conversations.json entry 1 (id abs)",
                            "conversations.json entry 2 (id noturns)"}
    assert "absolute" in reasons["conversations.json entry 1 (id abs)"]
    assert "human turn" in reasons["conversations.json entry 2 (id noturns)"]


# --- Hugging Face datasets ---------------------------------------------------------------


def hf_images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (5 + i, 4), (40 * i, 10, 200)) for i in range(count)]


def hf_dataset(images: list[Image.Image], captions: list[str]):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)


def test_hf_dataset_dir(tmp_path: Path):
    images = hf_images(4)
    captions = ["red-ish", "a bit greener", "ça va", "last"]
    folder = tmp_path / "hfset"
    hf_dataset(images, captions).save_to_disk(str(folder))

    dataset = read_dataset(folder)

    assert dataset.kind == "pairs"
    assert dataset.fmt == "hf"
    assert dataset.rejected == []
    assert [record.captions for record in dataset.records] == [(c,) for c in captions]
    keys = [record.image.key for record in dataset.records]
    assert len(set(keys)) == 4
    assert all(key.endswith(".png") for key in keys)
    for record, image in zip(dataset.records, images, strict=True):
        loaded = load_image_uint8(record.image, record.where)
        expected = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        assert torch.equal(loaded, expected)
    assert mirror_manifest_name(dataset) == "manifest.jsonl"

    out = tmp_path / "manifest.jsonl"
    write_mirror(out, dataset, [(triggered(r), "images/" + r.image.key) for r in dataset.records])
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["caption"] for row in written] == ["TRIG " + c for c in captions]
    assert [row["image"] for row in written] == ["images/" + key for key in keys]


def test_hf_dataset_dict_needs_a_split(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    full = hf_dataset(hf_images(5), ["t0", "t1", "t2", "s0", "s1"])
    folder = tmp_path / "hfdict"
    datasets.DatasetDict({"train": full.select(range(3)),
                          "test": full.select(range(3, 5))}).save_to_disk(str(folder))

    with pytest.raises(MMGuardError) as info:
        read_dataset(folder)
    message = str(info.value)
    assert "train" in message
    assert "test" in message
    assert "split" in message

    with pytest.raises(MMGuardError):
        read_dataset(folder, split="validation")

    test = read_dataset(folder, split="test")
    assert [record.captions for record in test.records] == [("s0",), ("s1",)]
    first = load_image_uint8(test.records[0].image, test.records[0].where)
    assert tuple(first.shape) == (3, 4, 8)  # the fourth image: 8 x 4
    assert [int(v) for v in first[:, 0, 0]] == [120, 10, 200]


# --- bad inputs --------------------------------------------------------------------------


def test_unsupported_suffix(tmp_path: Path):
    path = tmp_path / "list.txt"
    path.write_text("a.png,a cat\n", encoding="utf-8")
    with pytest.raises(MMGuardError) as info:
        read_dataset(path)
    assert "unsupported" in str(info.value)
    assert ".txt" in str(info.value)


def test_missing_path(tmp_path: Path):
    with pytest.raises(MMGuardError) as info:
        read_dataset(tmp_path / "nope.csv")
    assert "not found" in str(info.value)
    assert "nope.csv" in str(info.value)


def test_plain_folder_is_not_a_dataset(tmp_path: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    with pytest.raises(MMGuardError) as info:
        read_dataset(folder)
    assert "folder" in str(info.value)
    assert "manifest" in str(info.value)


@pytest.mark.parametrize("content", [
    json.dumps({"image": "a.png", "caption": "not a list"}),
    json.dumps([{"image": "a.png", "caption": "no conversations"}]),
    "[1, 2, 3]",
])
def test_json_that_is_not_llava(tmp_path: Path, content: str):
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MMGuardError) as info:
        read_dataset(path)
    assert "LLaVA" in str(info.value)


def test_json_that_does_not_parse(tmp_path: Path):
    path = tmp_path / "data.json"
    path.write_text("[{'single': 'quotes'}]", encoding="utf-8")
    with pytest.raises(MMGuardError) as info:
        read_dataset(path)
    assert "not valid JSON" in str(info.value)


def test_csv_not_utf8(tmp_path: Path):
    path = tmp_path / "manifest.csv"
    path.write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(MMGuardError) as info:
        read_dataset(path)
    assert "UTF-8" in str(info.value)


# --- fingerprint -------------------------------------------------------------------------


def test_fingerprint_follows_manifest_bytes(tmp_path: Path):
    path = write_csv_rows(tmp_path / "manifest.csv", ["image", "caption"], [["a.png", "a cat"]])
    first = fingerprint(read_dataset(path))
    assert first["input"] == str(path)
    assert len(first["input_sha256"]) == 64
    assert fingerprint(read_dataset(path)) == first

    write_csv_rows(path, ["image", "caption"], [["a.png", "a cat!"]])
    changed = fingerprint(read_dataset(path))
    assert changed["input"] == first["input"]
    assert changed["input_sha256"] != first["input_sha256"]


def test_fingerprint_of_hf_dir_changes_with_data(tmp_path: Path):
    folder_a = tmp_path / "a"
    folder_b = tmp_path / "b"
    hf_dataset(hf_images(2), ["x", "y"]).save_to_disk(str(folder_a))
    hf_dataset(hf_images(2), ["x", "z"]).save_to_disk(str(folder_b))
    print_a = fingerprint(read_dataset(folder_a))
    print_b = fingerprint(read_dataset(folder_b))
    assert "input_sha256" in print_a
    assert print_a["input_sha256"] != print_b["input_sha256"]
