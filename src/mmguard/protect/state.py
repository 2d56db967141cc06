"""Per-item optimisation state on disk, so memory follows the batch, not the dataset.

Perturbations are kept as one float16 `.npy` file per image under
`OUT/.mmguard/work/deltas/` (float16 holds a budget-sized value to ~1e-5, far
below one 8-bit level); triggers, the surrogate and the round counter sit next
to them. A killed run resumes from the last finished round.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


class PerturbationStore:
    def __init__(self, folder: Path):
        self.folder = folder
        (folder / "deltas").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / "deltas" / (hashlib.sha1(key.encode()).hexdigest() + ".npy")

    def has_delta(self, key: str) -> bool:
        return self._path(key).exists()

    def delta(self, key: str, shape: torch.Size) -> torch.Tensor:
        path = self._path(key)
        if not path.exists():
            return torch.zeros(shape)
        return torch.from_numpy(np.load(path).astype(np.float32))

    def save_delta(self, key: str, delta: torch.Tensor) -> None:
        path = self._path(key)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, delta.detach().cpu().numpy().astype(np.float16))
        os.replace(tmp, path)

    def read_json(self, name: str, default: Any) -> Any:
        path = self.folder / name
        return json.loads(path.read_text()) if path.exists() else default

    def write_json(self, name: str, data: Any) -> None:
        path = self.folder / name
        tmp = path.with_name(f".tmp-{name}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def save_module(self, name: str, state: dict[str, Any]) -> None:
        path = self.folder / name
        tmp = path.with_name(f".tmp-{name}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_module(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        return torch.load(path, weights_only=False) if path.exists() else None
