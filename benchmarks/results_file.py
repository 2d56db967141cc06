"""The resumable results file every benchmark keeps: load, and save with the machine stamped.

Saving merges: rows another benchmark process saved meanwhile (say, a second
process running other stages on the other cores) are kept, not overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_results(path: Path, results: dict, write_table: Callable[[dict], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        for key, row in load_results(path).get("rows", {}).items():
            results["rows"].setdefault(key, row)
        results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version()}
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(partial, path)  # a crash mid-write never leaves a truncated file
        write_table(results)


def forget_results(path: Path) -> dict:
    """--force: start from nothing (the old file goes, so merging cannot bring rows back)."""
    path.unlink(missing_ok=True)
    return {"rows": {}}
