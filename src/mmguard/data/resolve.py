"""Naming data: one resolver for every command that takes a dataset.

    resolve_dataset("photos/manifest.csv")          # a manifest (CSV, JSONL, LLaVA JSON)
    resolve_dataset("hf-folder", split="train")     # a Hugging Face datasets folder
    resolve_dataset("emoji:test", "triples")        # a built-in dataset, read as triples

Run records name their input the way `Dataset.source` spells it
("builtin:emoji/train", "hf-folder [train]"); those names resolve too, so a
protected folder can always find its originals.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmguard.data.builtin import BUILTINS, load_builtin
from mmguard.data.records import Dataset, Kind
from mmguard.data.sources import read_dataset
from mmguard.errors import MMGuardError

_RECORDED_BUILTIN = re.compile(r"builtin:(?P<name>[^/]+)/(?P<split>.+)")
_RECORDED_SPLIT = re.compile(r"(?P<path>.+) \[(?P<split>[^\]]+)\]")


class DatasetNotFound(MMGuardError):
    """The name is neither an existing file or folder nor a built-in dataset."""


def resolve_dataset(spec: str | Path, kind: Kind = "pairs", split: str | None = None) -> Dataset:
    """The dataset `spec` names; built-in data is read as `kind`.

    A manifest or datasets folder says itself what it holds (pairs or
    triples); callers that need one kind check it with their own message.
    `split` picks a split of a Hugging Face DatasetDict.
    """
    text = str(spec)
    if Path(text).exists():
        return read_dataset(Path(text), split)
    if (recorded := _RECORDED_SPLIT.fullmatch(text)) and Path(recorded["path"]).exists():
        return read_dataset(Path(recorded["path"]), recorded["split"])
    if builtin := _RECORDED_BUILTIN.fullmatch(text):
        return load_builtin(builtin["name"], builtin["split"], kind)
    name, _, builtin_split = text.partition(":")
    if name in BUILTINS and builtin_split:
        return load_builtin(name, builtin_split, kind)
    raise DatasetNotFound(f"input not found: {text!r} is neither an existing manifest (or "
                          "Hugging Face datasets folder) nor NAME:SPLIT of a built-in dataset "
                          f"({', '.join(BUILTINS)})")
