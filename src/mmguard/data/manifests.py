"""CSV and JSONL manifests: one row per record, image paths relative to the manifest.

Pairs use the columns ``image`` and ``caption``; triples use ``image``,
``prompt`` and ``response``. Other columns are kept and written back
unchanged. In JSONL a caption may also be a list of strings (several captions
of one image). Several rows may name the same image.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from pathlib import Path
from typing import Any

from mmguard.data.records import (
    Dataset,
    ImageRef,
    Kind,
    PairRecord,
    Record,
    Rejected,
    TripleRecord,
)
from mmguard.errors import MMGuardError

PAIR_COLUMNS = ("image", "caption")
TRIPLE_COLUMNS = ("image", "prompt", "response")


def kind_from_columns(columns: set[str] | list[str], source: str) -> Kind:
    columns = set(columns)
    if {"image", "prompt", "response"} <= columns:
        return "triples"
    if {"image", "caption"} <= columns:
        return "pairs"
    raise MMGuardError(
        f"{source}: expected columns image,caption (pairs) or image,prompt,response "
        f"(triples); found {', '.join(sorted(columns)) or 'none'}"
    )


def safe_image_key(value: Any, root: Path) -> tuple[str | None, str | None]:
    """Validate a manifest image path. Returns (key, None) or (None, reason).

    The key is the normalised POSIX path relative to the manifest's folder.
    Paths are checked lexically, so a symlink inside the folder is allowed but
    ``../x`` and absolute paths are not: a manifest must not reach files its
    folder does not hold.
    """
    if not isinstance(value, str) or not value.strip():
        return None, "no image path given"
    text = value.strip().replace("\\", "/")
    if "://" in text:
        return None, f"image path {value!r} is a URL; download the images and use local paths"
    if text.startswith("/") or os.path.isabs(value) or (len(text) > 1 and text[1] == ":"):
        return None, f"image path {value!r} is absolute; it must be relative to {root}"
    key = posixpath.normpath(text)
    if key == ".." or key.startswith("../") or key == ".":
        return None, f"image path {value!r} points outside the manifest's folder {root}"
    return key, None


def make_record(kind: Kind, key: str, root: Path, fields: dict[str, Any], where: str,
                raw: Any) -> Record:
    image = ImageRef(key=key, path=root / key)
    if kind == "pairs":
        caption = fields.get("caption")
        captions = tuple(caption) if isinstance(caption, list) else (caption,)
        return PairRecord(image=image, captions=tuple(_as_text(c) for c in captions),
                          where=where, raw=raw)
    return TripleRecord(image=image, prompt=_as_text(fields.get("prompt")),
                        response=_as_text(fields.get("response")), where=where, raw=raw)


def _as_text(value: Any) -> str:
    # Missing or null text becomes "", which validation reports as empty.
    return "" if value is None else str(value)


def read_csv(path: Path) -> Dataset:
    root = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            kind = kind_from_columns(columns, str(path))
            records: list[Record] = []
            rejected: list[Rejected] = []
            first_line = 2  # after the header
            for row in reader:
                # A quoted cell may span lines: name the row by its first line.
                where, first_line = f"{path.name} line {first_line}", reader.line_num + 1
                key, problem = safe_image_key(row.get("image"), root)
                if problem:
                    rejected.append(Rejected(where, problem))
                    continue
                records.append(make_record(kind, key, root, row, where, raw=row))
    except UnicodeDecodeError as exc:
        raise MMGuardError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise MMGuardError(f"{path}: malformed CSV ({exc})") from None
    return Dataset(kind=kind, records=records, source=str(path), fmt="csv", root=root,
                   meta={"columns": list(columns), "name": path.name}, rejected=rejected)


def read_jsonl(path: Path) -> Dataset:
    root = path.parent
    records: list[Record] = []
    rejected: list[Rejected] = []
    kind: Kind | None = None
    try:
        # Only "\n" ends a JSONL line: str.splitlines() would also split on
        # U+2028 and friends, which JSON strings may hold unescaped.
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as exc:
        raise MMGuardError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejected.append(Rejected(where, f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            rejected.append(Rejected(where, "expected a JSON object"))
            continue
        if kind is None:
            kind = kind_from_columns(row.keys(), where)
        key, problem = safe_image_key(row.get("image"), root)
        if problem:
            rejected.append(Rejected(where, problem))
            continue
        records.append(make_record(kind, key, root, row, where, raw=row))
    if kind is None:
        raise MMGuardError(f"{path}: no records (the file has no JSON object lines)")
    return Dataset(kind=kind, records=records, source=str(path), fmt="jsonl", root=root,
                   meta={"name": path.name}, rejected=rejected)


def mirror_row(record: Record, image_path: str) -> dict[str, Any]:
    """The record's source row with the new image path and (triggered) texts."""
    row = dict(record.raw) if isinstance(record.raw, dict) else {}
    row["image"] = image_path
    if isinstance(record, PairRecord):
        original = row.get("caption")
        row["caption"] = list(record.captions) if isinstance(original, list) else record.captions[0]
    else:
        row["prompt"], row["response"] = record.prompt, record.response
    return row


def write_csv(path: Path, dataset: Dataset, rows: list[tuple[Record, str]]) -> None:
    columns = dataset.meta.get("columns") or list(
        PAIR_COLUMNS if dataset.kind == "pairs" else TRIPLE_COLUMNS)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record, image_path in rows:
            # A CSV row holds one caption: a record with several becomes several rows.
            for text in record.texts() if isinstance(record, PairRecord) else (None,):
                single = record if text is None else record.with_texts((text,))
                writer.writerow(mirror_row(single, image_path))


def write_jsonl(path: Path, dataset: Dataset, rows: list[tuple[Record, str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record, image_path in rows:
            handle.write(json.dumps(mirror_row(record, image_path), ensure_ascii=False) + "\n")
