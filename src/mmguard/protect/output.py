"""Writing a protected dataset: files, journal, manifest, run record, resume.

The folder's layout and the run record's format belong to
`mmguard.data.release`; this module is the run's journal and lock around them:

    OUT/.mmguard/journal.jsonl                   append-only log of finished items
    OUT/.mmguard/lock                            held while a run writes here

Each image is written to a temporary file and checked, one journal line is
appended and fsynced, then the file is renamed into place. The journal is the
truth for `--resume`; the manifest and run record are rebuilt from it at every
flush, so a killed run leaves a usable, consistent folder of everything
finished so far.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mmguard import __version__
from mmguard.data.budget import levels, quantize_release
from mmguard.data.images import DecodedImage, read_png_uint8, write_png_temporary
from mmguard.data.records import Dataset, Record
from mmguard.data.release import (
    STATE_DIR,
    Budget,
    RecordedInput,
    ReleasedItem,
    RunRecord,
    has_run_record,
    output_image_paths,
    read_run_record,
    write_run_record,
)
from mmguard.data.sources import mirror_manifest_name, write_mirror
from mmguard.data.stealth import linf_levels, psnr_db
from mmguard.data.trigger_text import insert_trigger
from mmguard.errors import MMGuardError

FLUSH_SECONDS = 30.0
# Settings that may differ between a run and its resumption.
RESUMABLE_DIFFERENCES = frozenset({"limit", "skip_bad", "device"})


def package_versions() -> dict[str, str]:
    versions = {"mmguard": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "pillow", "open_clip_torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_output_folder(out_dir: Path, input_root: Path | None, resume: bool) -> bool:
    """Refuse folders that would mix or overwrite data. Returns True when resuming."""
    out = out_dir.resolve()
    if input_root is not None:
        root = input_root.resolve()
        if out == root or out.is_relative_to(root):
            raise MMGuardError(
                f"--out {out_dir} is the input's folder or inside it ({root}); choose a folder "
                "outside the input so the originals can never be overwritten")
    if out.exists() and not out.is_dir():
        raise MMGuardError(f"--out {out_dir} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if has_run_record(out) or (out / STATE_DIR / "journal.jsonl").exists():
        if resume:
            return True
        raise MMGuardError(f"--out {out_dir} holds an earlier mmguard run; add --resume to "
                           "continue it, or choose a new folder")
    raise MMGuardError(f"--out {out_dir} is not empty and was not written by mmguard; choose a "
                       "new or empty folder")


class ProtectedDatasetWriter:
    """Owns one output folder for one run (or its resumption)."""

    def __init__(self, out_dir: Path, dataset: Dataset, config: dict[str, Any],
                 command: list[str], resume: bool, trigger_position: str | int = "start"):
        self.out_dir = out_dir
        self.dataset = dataset
        self.config = config
        self.command = command
        self.trigger_position = trigger_position
        self.output_paths = output_image_paths(dataset)
        self.resuming = check_output_folder(out_dir, dataset.root, resume)
        (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        self.finished: dict[str, ReleasedItem] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        self.history: list[dict[str, Any]] = []
        if self.resuming:
            self._load_previous()
            # A killed run can leave a half-written temporary; never a half image.
            for stray in (out_dir / "images").rglob(".tmp-*"):
                stray.unlink()
        self._journal = (out_dir / STATE_DIR / "journal.jsonl").open("a", encoding="utf-8")
        self.history.append({"command": command, "started": _now()})
        self._last_flush = time.monotonic()
        self.flush(status="running")

    # -- setup -------------------------------------------------------------
    def _acquire_lock(self):
        handle = (self.out_dir / STATE_DIR / "lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise MMGuardError(f"another mmguard run is writing to {self.out_dir}") from None
        return handle

    def _load_previous(self) -> None:
        if has_run_record(self.out_dir):
            previous = read_run_record(self.out_dir)
            self._check_same_config(previous.config)
            self.history = previous.history
        journal = self.out_dir / STATE_DIR / "journal.jsonl"
        if not journal.exists():
            return
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is simply redone
            if entry.get("status") == "done" and (self.out_dir / entry["file"]).exists():
                item = ReleasedItem.from_json(entry)
                if item.trigger and item.trigger_position is None:
                    # Journals written before positions were recorded: the run's own.
                    item = replace(item, trigger_position=self.trigger_position)
                self.finished[item.key] = item

    def _check_same_config(self, previous: dict[str, Any]) -> None:
        keys = (set(previous) | set(self.config)) - RESUMABLE_DIFFERENCES
        differing = sorted(k for k in keys if previous.get(k) != self.config.get(k))
        if differing:
            details = "; ".join(f"{k}: was {previous.get(k)!r}, now {self.config.get(k)!r}"
                                for k in differing)
            raise MMGuardError(f"--resume: {self.out_dir} was written with other settings "
                               f"({details}); use the same command, or a new folder")

    # -- per item ------------------------------------------------------------
    def is_finished(self, key: str) -> bool:
        return key in self.finished

    def write_item(self, key: str, original: DecodedImage, protected: torch.Tensor,
                   trigger: str | None) -> ReleasedItem:
        eps = self.config["eps"]
        image_u8 = quantize_release(original, protected, eps)
        relative = self.output_paths[key]
        target = self.out_dir / relative
        # Order matters for --resume: check the temporary file, journal it, then
        # rename. A final file therefore always has its journal line, and a
        # crash at any point never makes a finished file be written again.
        temporary = write_png_temporary(image_u8, target.parent)
        try:
            saved = read_png_uint8(temporary)
            stored = original.stored
            # Measured on the colour channels, against the stored colour values.
            change = linf_levels(original.colour, saved[:3]) \
                if saved.shape == stored.shape else None
            if change is None or change > levels(eps) or not torch.equal(saved[3:], stored[3:]):
                raise RuntimeError(f"{key}: saved file breaks the budget ({change}/255 > eps), "
                                   "the size or the alpha channel; this is a bug in mmguard, "
                                   "please report it")
            item = ReleasedItem(key, relative, change, psnr_db(original.colour, saved[:3]),
                                trigger, self.trigger_position if trigger else None,
                                alpha=original.alpha is not None)
            self._append_journal({"status": "done", **item.to_json()})
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self.finished[key] = item
        self.skipped.pop(key, None)
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush(status="running")
        return item

    def skip_item(self, key: str, where: str, reason: str) -> None:
        self.skipped[key] = {"item": where, "reason": reason}

    def _append_journal(self, entry: dict[str, Any]) -> None:
        self._journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    # -- whole run -------------------------------------------------------------
    def manifest_rows(self) -> list[tuple[Record, str]]:
        rows = []
        for record in self.dataset.records:
            item = self.finished.get(record.image.key)
            if item is None:
                continue
            texts = tuple(insert_trigger(t, item.trigger, item.trigger_position)
                          for t in record.texts())
            rows.append((record.with_texts(texts), item.file))
        return rows

    def flush(self, status: str, error: str | None = None,
              optimisation: dict[str, Any] | None = None) -> None:
        write_mirror(self.out_dir / mirror_manifest_name(self.dataset), self.dataset,
                     self.manifest_rows())
        self.history[-1].update({"updated": _now(), "status": status})
        config = self.config
        write_run_record(self.out_dir, RunRecord(
            input=RecordedInput(self.dataset.source, self.dataset.fmt, self.dataset.kind),
            budget=Budget(config["eps"], levels(config["eps"]), config.get("trigger_len")),
            items=list(self.finished.values()), status=status, error=error,
            mmguard_version=__version__, config=config, versions=package_versions(),
            platform={"python": sys.version.split()[0], "machine": platform.machine()},
            history=self.history, optimisation=optimisation or {},
            skipped=[{"key": k, **v} for k, v in self.skipped.items()]))
        self._last_flush = time.monotonic()

    def close(self, status: str, error: str | None = None,
                optimisation: dict[str, Any] | None = None) -> None:
        try:
            self.flush(status, error, optimisation)
        finally:
            self._journal.close()
            self._lock.close()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
