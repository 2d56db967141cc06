"""The data model: image references, the two record types, and a dataset.

A *record* is one training example as the user's data states it: an
image-caption pair (one image, one or more captions) or an instruction triple
(image, prompt, response). Several records may share one image (COCO has five
caption rows per image; a LLaVA conversation has several turns); protection
works per image, so every record of an image gets the same perturbation and
the same trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

Kind = Literal["pairs", "triples"]
KINDS: tuple[Kind, ...] = ("pairs", "triples")


@dataclass(frozen=True)
class ImageRef:
    """Where an image comes from.

    `key` is the image's name inside its dataset, a relative POSIX path such as
    ``"photos/cat.jpg"``; it decides the protected file's name and must be
    unique per image. Exactly one of `path` (a file on disk) or `opener` (a
    callable returning a PIL image, for built-in and Hugging Face datasets) is
    set.
    """

    key: str
    path: Path | None = None
    opener: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if (self.path is None) == (self.opener is None):
            raise ValueError("ImageRef needs exactly one of path or opener")


@dataclass(frozen=True)
class PairRecord:
    """An image with one or more captions."""

    image: ImageRef
    captions: tuple[str, ...]
    where: str  # how to find this record in the source, e.g. "manifest.csv row 12"
    raw: Any = field(default=None, compare=False, repr=False)  # source row, for mirroring

    def texts(self) -> tuple[str, ...]:
        return self.captions

    def named_texts(self) -> list[tuple[str, str]]:
        return [("caption", caption) for caption in self.captions]

    def with_texts(self, texts: tuple[str, ...]) -> PairRecord:
        return replace(self, captions=texts)


@dataclass(frozen=True)
class TripleRecord:
    """An instruction triple: the image, the user's prompt and the response."""

    image: ImageRef
    prompt: str
    response: str
    where: str
    raw: Any = field(default=None, compare=False, repr=False)

    def texts(self) -> tuple[str, ...]:
        # The trigger goes into the prompt; the response is the training target.
        return (self.prompt,)

    def named_texts(self) -> list[tuple[str, str]]:
        return [("prompt", self.prompt), ("response", self.response)]

    def with_texts(self, texts: tuple[str, ...]) -> TripleRecord:
        (prompt,) = texts
        return replace(self, prompt=prompt)


Record = PairRecord | TripleRecord


@dataclass(frozen=True)
class Rejected:
    """A source row that could not become a record (no image path, unsafe path...)."""

    where: str
    reason: str


@dataclass
class Dataset:
    """Records of one kind plus what is needed to write a mirror of the source.

    `source` names the input for messages and run records (a manifest path or
    ``builtin:emoji/train``); `fmt` is the manifest format that reads and
    writes it; `meta` holds format-specific details (CSV column order, the
    full LLaVA JSON, ...) that the format's writer uses to mirror the input.
    `root` is the folder image paths are relative to (None for in-memory sets).
    `rejected` lists source rows that could not be read as records; the
    protect command reports them like any other bad item.
    """

    kind: Kind
    records: list[Record]
    source: str
    fmt: str
    root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)

    def images(self) -> list[ImageRef]:
        """Distinct images in first-appearance order."""
        seen: dict[str, ImageRef] = {}
        for record in self.records:
            seen.setdefault(record.image.key, record.image)
        return list(seen.values())

    def records_by_image(self) -> dict[str, list[int]]:
        """Image key -> indices of the records that use it, in source order."""
        groups: dict[str, list[int]] = {}
        for index, record in enumerate(self.records):
            groups.setdefault(record.image.key, []).append(index)
        return groups
