"""Writing a protected dataset: files, journal, manifest, run record, resume.

Layout of an output folder:

    OUT/images/<image key's folder>/<stem>.png   protected images, original size
    OUT/<manifest name>                          mirror of the input manifest
    OUT/mmguard-run.json                         run record (settings, versions, per item)
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
import posixpath
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mmguard import __version__
from mmguard.data.budget import levels, quantize_within_budget
from mmguard.data.images import read_png_uint8, write_png_temporary
from mmguard.data.records import Dataset, Record
from mmguard.data.sources import mirror_manifest_name, write_mirror
from mmguard.data.stealth import linf_levels, psnr_db
from mmguard.data.trigger_text import insert_trigger
from mmguard.errors import MMGuardError

RUN_RECORD = "mmguard-run.json"
STATE_DIR = ".mmguard"
FLUSH_SECONDS = 30.0
# Settings that may differ between a run and its resumption.
RESUMABLE_DIFFERENCES = frozenset({"limit", "skip_bad", "device"})


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


def package_versions() -> dict[str, str]:
    versions = {"mmguard": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "pillow", "open_clip_torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


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
    if (out / RUN_RECORD).exists() or (out / STATE_DIR / "journal.jsonl").exists():
        if resume:
            return True
        raise MMGuardError(f"--out {out_dir} holds an earlier mmguard run; add --resume to "
                           "continue it, or choose a new folder")
    raise MMGuardError(f"--out {out_dir} is not empty and was not written by mmguard; choose a "
                       "new or empty folder")


@dataclass
class FinishedItem:
    key: str
    file: str  # relative to the output folder
    linf_levels: int
    psnr_db: float
    trigger: str | None

    def to_json(self) -> dict[str, Any]:
        psnr = None if self.psnr_db == float("inf") else round(self.psnr_db, 3)
        return {"key": self.key, "file": self.file, "linf": self.linf_levels / 255.0,
                "linf_levels": self.linf_levels, "psnr_db": psnr, "trigger": self.trigger}


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
        self.finished: dict[str, FinishedItem] = {}
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
        record_path = self.out_dir / RUN_RECORD
        if record_path.exists():
            previous = json.loads(record_path.read_text(encoding="utf-8"))
            self._check_same_config(previous.get("config", {}))
            self.history = previous.get("history", [])
        journal = self.out_dir / STATE_DIR / "journal.jsonl"
        if not journal.exists():
            return
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that item is simply redone
            if entry.get("status") == "done" and (self.out_dir / entry["file"]).exists():
                psnr = entry["psnr_db"]
                self.finished[entry["key"]] = FinishedItem(
                    entry["key"], entry["file"], entry["linf_levels"],
                    float("inf") if psnr is None else psnr, entry.get("trigger"))

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

    def write_item(self, key: str, original_u8: torch.Tensor, protected: torch.Tensor,
                   trigger: str | None) -> FinishedItem:
        eps = self.config["eps"]
        image_u8 = quantize_within_budget(original_u8, protected, eps)
        relative = self.output_paths[key]
        target = self.out_dir / relative
        # Order matters for --resume: check the temporary file, journal it, then
        # rename. A final file therefore always has its journal line, and a
        # crash at any point never makes a finished file be written again.
        temporary = write_png_temporary(image_u8, target.parent)
        try:
            saved = read_png_uint8(temporary)
            change = linf_levels(original_u8, saved)
            if saved.shape != original_u8.shape or change > levels(eps):
                raise RuntimeError(f"{key}: saved file breaks the budget ({change}/255 > eps) "
                                   "or size; this is a bug in mmguard, please report it")
            item = FinishedItem(key, relative, change, psnr_db(original_u8, saved), trigger)
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
            texts = tuple(insert_trigger(t, item.trigger, self.trigger_position)
                          for t in record.texts())
            rows.append((record.with_texts(texts), item.file))
        return rows

    def flush(self, status: str, error: str | None = None,
              optimisation: dict[str, Any] | None = None) -> None:
        write_mirror(self.out_dir / mirror_manifest_name(self.dataset), self.dataset,
                     self.manifest_rows())
        finished = list(self.finished.values())
        finite_psnr = [i.psnr_db for i in finished if i.psnr_db != float("inf")]
        self.history[-1].update({"updated": _now(), "status": status})
        record = {
            "mmguard_version": __version__,
            "status": status,
            "error": error,
            "input": {"source": self.dataset.source, "format": self.dataset.fmt,
                      "kind": self.dataset.kind},
            "config": self.config,
            "budgets": {"eps": self.config["eps"], "eps_levels": levels(self.config["eps"]),
                        "trigger_len": self.config.get("trigger_len")},
            "versions": package_versions(),
            "platform": {"python": sys.version.split()[0], "machine": platform.machine()},
            "history": self.history,
            "counts": {"finished": len(finished), "skipped": len(self.skipped)},
            "summary": {
                "max_linf_levels": max((i.linf_levels for i in finished), default=0),
                "mean_psnr_db": round(sum(finite_psnr) / len(finite_psnr), 3)
                if finite_psnr else None,
            },
            "optimisation": optimisation or {},
            "skipped": [{"key": k, **v} for k, v in self.skipped.items()],
            "items": [i.to_json() for i in finished],
        }
        _write_json_atomic(self.out_dir / RUN_RECORD, record)
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
