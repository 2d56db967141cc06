"""Shared pieces of the built-in datasets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from mmguard.data.records import Dataset, ImageRef, Kind, PairRecord, Record, TripleRecord

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class BuiltinItem:
    key: str  # file name of the image, e.g. "1f600.png"
    opener: Callable[[], Image.Image]
    captions: tuple[str, ...]  # pairs form: one row per caption, the image repeated
    answer: str  # triples form: the response to the dataset's prompt
    # More manifest columns as (name, value), the same names for every item of a dataset.
    columns: tuple[tuple[str, str], ...] = ()


def split_of(name: str) -> str:
    """A stable train/test assignment from the item's name alone.

    Hashing the name (not shuffling a list) keeps every item's split fixed when
    the source package adds or drops items.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def build_dataset(name: str, split: str, kind: Kind, items: list[BuiltinItem],
                  prompt: str) -> Dataset:
    records: list[Record] = []
    for item in items:
        image = ImageRef(key=item.key, opener=item.opener)
        where = f"{name}/{split} {item.key}"
        extra = dict(item.columns)
        if kind == "pairs":
            records.extend(PairRecord(image=image, captions=(caption,), where=where,
                                      raw={"image": item.key, "caption": caption, **extra})
                           for caption in item.captions)
        else:
            records.append(TripleRecord(image=image, prompt=prompt, response=item.answer,
                                        where=where, raw={"image": item.key, "prompt": prompt,
                                                          "response": item.answer, **extra}))
    columns = ["image", "caption"] if kind == "pairs" else ["image", "prompt", "response"]
    columns += [name for name, _ in items[0].columns] if items else []
    return Dataset(kind=kind, records=records, source=f"builtin:{name}/{split}", fmt="builtin",
                   meta={"columns": columns, "name": "manifest.csv"})
