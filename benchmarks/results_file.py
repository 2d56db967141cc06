"""The resumable results file every benchmark keeps: load, and save with the machine stamped."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_results(path: Path, results: dict, write_table: Callable[[dict], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_table(results)
