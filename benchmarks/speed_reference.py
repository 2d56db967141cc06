"""MEM per-batch phase timings at the reference implementation's own settings.

calibration.md measured the MEM reference code on this machine: RN50 from
scratch at 224 px, batch 16, trigger length 5, top-16 HotFlip candidates,
8 PGD steps of 1/255. This times one batch of each mmguard phase at the same
settings, so the two can be compared per phase.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch

REFERENCE = {"surrogate training step": 7.0, "trigger update (HotFlip)": 187.0,
             "image PGD (8 steps)": 29.4, "trigger + PGD": 216.4}
SETTINGS = "RN50 from scratch, 224 px, batch 16, trigger 5, top-16, 8 PGD steps of 1/255"


def measure_phases(batch: int = 16) -> dict:
    from mmguard.data.builtin import load_builtin
    from mmguard.data.images import load_image_uint8, to_float
    from mmguard.protect import engine
    from mmguard.protect.base import ProtectionItem
    from mmguard.protect.registry import create_method

    records = load_builtin("emoji", "train").records[:batch]
    items = [ProtectionItem(r.image.key, to_float(load_image_uint8(r.image, r.where)),
                            list(r.captions)) for r in records]
    method = create_method("mem", "pairs", batch_size=batch, trigger_len=5, top_k=16,
                           pgd_steps=8, surrogates=("RN50",))
    method.setup(Path("/tmp/mmguard-speed-reference"))
    phases: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - started, 2)
            return result
        return wrapper

    method.surrogate.train_step = timed("surrogate training step", method.surrogate.train_step)
    method._trigger_step = timed("trigger update (HotFlip)", method._trigger_step)
    original_pgd = engine.pgd
    engine.pgd = timed("image PGD (8 steps)", original_pgd)
    try:
        method._optimise_batch(items, round_index=0, update_trigger=True)
    finally:
        engine.pgd = original_pgd
    phases["trigger + PGD"] = round(phases["trigger update (HotFlip)"]
                                    + phases["image PGD (8 steps)"], 2)
    speedup = REFERENCE["trigger + PGD"] / phases["trigger + PGD"]
    return {"settings": SETTINGS, "phases": phases, "reference": REFERENCE,
            "speedup_trigger_plus_pgd": round(speedup, 2),
            "threads": torch.get_num_threads(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


if __name__ == "__main__":
    import json

    print(json.dumps(measure_phases(), indent=1))
