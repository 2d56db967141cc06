"""Writing a dataset (usually a built-in one) out as image files plus a manifest."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from mmguard.data.images import open_pil
from mmguard.data.manifests import write_csv, write_jsonl
from mmguard.data.records import Dataset, Record, TripleRecord
from mmguard.errors import MMGuardError

FORMATS = ("csv", "jsonl", "llava")


def export_dataset(dataset: Dataset, out_dir: Path, fmt: str = "csv",
                   limit: int | None = None, spread: bool = False) -> Path:
    """Write images under OUT/images/ (PNG, original mode) and a manifest; return its path.

    `limit` keeps the first N images, or with `spread` N images evenly spaced over the
    set: a source sorted by category (emoji are) has one category in its first rows.
    """
    if fmt not in FORMATS:
        raise MMGuardError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "llava" and dataset.kind != "triples":
        raise MMGuardError("the llava format holds conversations: export with --kind triples")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MMGuardError(f"--out {out_dir} exists and is not an empty folder")
    keys = list(dataset.records_by_image())
    if spread and limit is not None and limit < len(keys):
        keys = [keys[i * len(keys) // limit] for i in range(limit)]
    else:
        keys = keys[:limit]
    chosen = set(keys)
    rows: list[tuple[Record, str]] = []
    written: set[str] = set()
    for record in dataset.records:
        key = record.image.key
        if key not in chosen:
            continue
        relative = f"images/{posixpath.splitext(key)[0]}.png"
        if key not in written:
            target = out_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            open_pil(record.image, record.where).save(target, format="PNG")
            written.add(key)
        rows.append((record, relative))
    manifest = out_dir / {"csv": "manifest.csv", "jsonl": "manifest.jsonl",
                          "llava": "conversations.json"}[fmt]
    if fmt == "csv":
        write_csv(manifest, dataset, rows)
    elif fmt == "jsonl":
        write_jsonl(manifest, dataset, rows)
    else:
        _write_llava_conversations(manifest, rows)
    return manifest


def _write_llava_conversations(path: Path, rows: list[tuple[Record, str]]) -> None:
    entries = []
    for record, relative in rows:
        assert isinstance(record, TripleRecord)
        entries.append({
            "id": posixpath.splitext(posixpath.basename(relative))[0],
            "image": relative,
            "conversations": [{"from": "human", "value": f"<image>\n{record.prompt}"},
                              {"from": "gpt", "value": record.response}],
        })
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
