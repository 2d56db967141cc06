"""The released dataset's format: where files go, and the run record beside them.

Layout of a folder `mmguard protect` writes:

    OUT/images/<image key's folder>/<stem>.png   protected images, original size
                                                 (<stem>__c<k>.png: one per caption row,
                                                 when the method protects per caption)
    OUT/<manifest name>                          mirror of the input manifest
    OUT/mmguard-run.json                         run record (settings, versions, per item)
    OUT/.mmguard/                                the writer's journal and lock

The run record is read with `read_run_record` and written with
`write_run_record`, nowhere else, so its format has one definition.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmguard.data.records import Dataset, PairRecord
from mmguard.data.trigger_text import Position
from mmguard.errors import MMGuardError

RUN_RECORD = "mmguard-run.json"
STATE_DIR = ".mmguard"
# The run record's config says how images were released; absent means "image".
RELEASE_PER = "release_per"


def per_caption_images(dataset: Dataset) -> Dataset:
    """The dataset with every caption row given an image of its own.

    A method that protects per caption (MEM's reference code on Flickr's five
    captions) releases an image once per row: row k of "img/a.jpg" reads the
    same file under the key "img/a__c<k>.jpg", so it gets its own file
    ("images/a__c<k>.png"), its own noise and its own trigger, with nothing
    else in the pipeline knowing. A row holding several captions (a JSONL
    list) becomes one row per caption. The rows keep their order and source.
    """
    rows = [single for record in dataset.records
            for single in ([record.with_texts((text,)) for text in record.captions]
                           if isinstance(record, PairRecord) and len(record.captions) > 1
                           else [record])]
    seen: dict[str, int] = {}
    records = []
    for record in rows:
        image = record.image
        k = seen[image.key] = seen.get(image.key, -1) + 1
        stem, extension = posixpath.splitext(image.key)
        records.append(replace(record, image=replace(image, key=f"{stem}__c{k}{extension}")))
    return replace(dataset, records=records)


def released_per_caption(dataset: Dataset) -> bool:
    """Whether `dataset` is a folder `mmguard protect` released one image per caption row
    (its run record says so; a manifest without one is taken as released per image)."""
    return (dataset.root is not None and has_run_record(dataset.root)
            and read_run_record(dataset.root).per_caption)


def output_image_paths(dataset: Dataset) -> dict[str, str]:
    """Image key -> protected file path relative to the output folder.

    The folder all images share is dropped and the rest mirrored, with the
    extension changed to .png: with every image under "img/", "img/a/x.jpg"
    becomes "images/a/x.png". The shared folder is computed over the whole
    dataset, so `--limit` never changes a file's name.
    """
    keys = list(dataset.records_by_image())
    folders = [posixpath.dirname(key) for key in keys]
    shared = posixpath.commonpath(folders) if keys and all(folders) else ""
    cut = len(shared) + 1 if shared else 0
    return {key: f"images/{posixpath.splitext(key[cut:])[0]}.png" for key in keys}


@dataclass(frozen=True)
class ReleasedItem:
    """One protected image as released: its file, how much it changed, its trigger.

    `linf_levels` and `psnr_db` are measured on the saved file's colour
    channels against the original's own colour values; `alpha` says the file
    carries the original's alpha channel unchanged.
    """

    key: str  # the original's image key
    file: str  # relative to the output folder
    linf_levels: int
    psnr_db: float  # inf for an unchanged image
    trigger: str | None = None
    trigger_position: Position | None = None  # where the trigger went into each text
    alpha: bool = False

    def to_json(self) -> dict[str, Any]:
        psnr = None if self.psnr_db == float("inf") else round(self.psnr_db, 3)
        entry = {"key": self.key, "file": self.file, "linf": self.linf_levels / 255.0,
                 "linf_levels": self.linf_levels, "psnr_db": psnr, "trigger": self.trigger}
        # Added fields are written only when they say something, so items of
        # older records and of trigger-less, opaque images keep their form.
        if self.trigger:
            entry["trigger_position"] = self.trigger_position
        if self.alpha:
            entry["alpha"] = True
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ReleasedItem:
        psnr = entry["psnr_db"]
        return cls(entry["key"], entry["file"], int(entry["linf_levels"]),
                   float("inf") if psnr is None else float(psnr), entry.get("trigger"),
                   entry.get("trigger_position"), bool(entry.get("alpha", False)))


@dataclass(frozen=True)
class Budget:
    """The run's budgets: eps as given, and the whole 8-bit levels the files keep to."""

    eps: float
    eps_levels: int
    trigger_len: int | None = None


@dataclass(frozen=True)
class RecordedInput:
    source: str  # a manifest path, a HF datasets folder [split] or builtin:NAME/SPLIT
    format: str
    kind: str


@dataclass
class RunRecord:
    """Everything `mmguard-run.json` says about a release."""

    input: RecordedInput
    budget: Budget
    items: list[ReleasedItem]
    status: str = "complete"
    error: str | None = None
    mmguard_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # what decides the output
    versions: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    optimisation: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def method(self) -> str | None:
        return self.config.get("method")

    @property
    def surrogates(self) -> tuple[str, ...]:
        return tuple(self.config.get("surrogates") or ())

    @property
    def per_caption(self) -> bool:
        """Released one image per caption row (see `per_caption_images`)."""
        return self.config.get(RELEASE_PER) == "caption"

    @property
    def max_linf_levels(self) -> int:
        return max((item.linf_levels for item in self.items), default=0)

    @property
    def mean_psnr_db(self) -> float | None:
        finite = [item.psnr_db for item in self.items if item.psnr_db != float("inf")]
        return round(sum(finite) / len(finite), 3) if finite else None

    def triggers_by_file(self) -> dict[str, tuple[str, Position | None]]:
        """File -> (trigger, position) of every item that has a trigger."""
        return {item.file: (item.trigger, item.trigger_position)
                for item in self.items if item.trigger}

    def to_json(self) -> dict[str, Any]:
        return {
            "mmguard_version": self.mmguard_version,
            "status": self.status,
            "error": self.error,
            "input": {"source": self.input.source, "format": self.input.format,
                      "kind": self.input.kind},
            "config": self.config,
            "budgets": {"eps": self.budget.eps, "eps_levels": self.budget.eps_levels,
                        "trigger_len": self.budget.trigger_len},
            "versions": self.versions,
            "platform": self.platform,
            "history": self.history,
            "counts": {"finished": len(self.items), "skipped": len(self.skipped)},
            "summary": {"max_linf_levels": self.max_linf_levels,
                        "mean_psnr_db": self.mean_psnr_db},
            "optimisation": self.optimisation,
            "skipped": self.skipped,
            "items": [item.to_json() for item in self.items],
        }


def write_run_record(folder: Path, record: RunRecord) -> None:
    """Replace `folder`'s run record in one step, so a reader never sees half of it."""
    path = folder / RUN_RECORD
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(record.to_json(), indent=1, ensure_ascii=False, allow_nan=False)
                   + "\n", encoding="utf-8")
    os.replace(tmp, path)


def has_run_record(folder: Path) -> bool:
    return (folder / RUN_RECORD).exists()


def read_run_record(folder: Path) -> RunRecord:
    """The run record of a folder `mmguard protect` wrote; MMGuardError saying what is wrong."""
    path = folder / RUN_RECORD
    if not path.exists():
        raise MMGuardError(f"{folder} has no {RUN_RECORD}: it is not a folder written by "
                           "`mmguard protect`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMGuardError(f"{path} is not readable JSON ({exc})") from None
    missing = [k for k in ("input", "budgets", "items") if not isinstance(data, dict)
               or k not in data]
    if missing:
        raise MMGuardError(f"{path} is not an mmguard run record (no {', '.join(missing)})")
    try:
        return _run_record(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MMGuardError(f"{path} is an incomplete or damaged run record "
                           f"({type(exc).__name__}: {exc})") from None


def _run_record(data: dict[str, Any]) -> RunRecord:
    given, budgets = data["input"], data["budgets"]
    return RunRecord(
        input=RecordedInput(given["source"], given.get("format", ""), given["kind"]),
        budget=Budget(float(budgets["eps"]), int(budgets["eps_levels"]),
                      budgets.get("trigger_len")),
        items=[ReleasedItem.from_json(entry) for entry in data["items"]],
        status=data.get("status", "complete"), error=data.get("error"),
        mmguard_version=data.get("mmguard_version", ""), config=data.get("config", {}),
        versions=data.get("versions", {}), platform=data.get("platform", {}),
        history=data.get("history", []), optimisation=data.get("optimisation") or {},
        skipped=data.get("skipped", []))
