"""One entry point to read any supported input, and to write its mirror."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from mmguard.data import hf_datasets, llava, manifests
from mmguard.data.records import Dataset, Record
from mmguard.errors import MMGuardError

MirrorWriter = Callable[[Path, Dataset, list[tuple[Record, str]]], None]

_WRITERS: dict[str, MirrorWriter] = {
    "csv": manifests.write_csv,
    "jsonl": manifests.write_jsonl,
    "llava": llava.write_llava,
    "hf": manifests.write_jsonl,
    "builtin": manifests.write_csv,
}


def read_dataset(path: str | Path, split: str | None = None) -> Dataset:
    """Read a CSV/JSONL manifest, a LLaVA JSON file or a HF datasets directory."""
    path = Path(path)
    if not path.exists():
        raise MMGuardError(f"input not found: {path}")
    if path.is_dir():
        if hf_datasets.is_hf_dataset_dir(path):
            return hf_datasets.read_hf_dataset(path, split)
        raise MMGuardError(f"{path} is a folder; pass its manifest file (.csv, .jsonl or .json)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return manifests.read_csv(path)
    if suffix == ".jsonl":
        return manifests.read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MMGuardError(f"{path}: not valid JSON ({exc})") from None
        if llava.looks_like_llava(data):
            return llava.read_llava(path, data)
        raise MMGuardError(f"{path}: JSON input must be a LLaVA-style list of "
                           "{'image', 'conversations'} entries")
    raise MMGuardError(f"{path}: unsupported manifest type {suffix or '(none)'}; "
                       "use .csv, .jsonl, LLaVA .json or a Hugging Face datasets folder")


def fingerprint(dataset: Dataset) -> dict[str, str]:
    """Identifies the input, so `--resume` refuses a manifest that changed."""
    identity = {"input": dataset.source}
    files: list[Path] = []
    if dataset.fmt in ("csv", "jsonl", "llava"):
        files = [Path(dataset.source)]
    elif dataset.fmt == "hf" and dataset.root is not None:
        files = sorted(dataset.root.rglob("state.json")) + sorted(dataset.root.rglob("*.arrow"))
    if files:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.read_bytes())
        identity["input_sha256"] = digest.hexdigest()
    return identity


def mirror_manifest_name(dataset: Dataset) -> str:
    """The output manifest's file name: the input's own name where it has one."""
    if dataset.fmt in ("csv", "jsonl", "llava"):
        return dataset.meta["name"]
    return "manifest.jsonl" if dataset.fmt == "hf" else "manifest.csv"


def write_mirror(path: Path, dataset: Dataset, rows: list[tuple[Record, str]]) -> None:
    """Write `rows` (record, new image path) in the input's own format."""
    _WRITERS[dataset.fmt](path, dataset, rows)
