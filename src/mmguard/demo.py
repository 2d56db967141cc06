"""The main job on bundled real data: export emoji, protect them, check the files.

What it shows today: the data path a user's folder takes (manifest in,
protected PNGs at original size plus a mirrored manifest and a run record
out), with the budget re-measured on the saved 8-bit files. The protection is
`random`, the control; model-based methods replace it as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mmguard.data.builtin import load_builtin
from mmguard.data.export import export_dataset
from mmguard.data.images import load_image_uint8, read_png_uint8
from mmguard.data.records import ImageRef
from mmguard.data.sources import fingerprint, read_dataset
from mmguard.errors import MMGuardError
from mmguard.evaluate.stealth import linf_levels
from mmguard.protect.base import MethodSettings
from mmguard.protect.budget import levels
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset

EPS = 8 / 255


def run_demo(out: Path, limit: int | None = None) -> None:
    if out.exists() and any(out.iterdir()):
        raise MMGuardError(f"{out} is not empty; remove it or pass --out NEW_FOLDER")
    started = time.monotonic()
    click.echo("mmguard demo: emoji train split -> random-noise protection (eps 8/255) -> "
               "budget check on the saved files. Takes well under a minute on 2 cores.")
    originals_dir, protected_dir = out / "emoji-train", out / "protected"
    manifest = export_dataset(load_builtin("emoji", "train", "pairs"), originals_dir,
                              "csv", limit)
    click.echo(f"1. exported the real emoji training split to {manifest}")
    dataset = read_dataset(manifest)
    method = create_method("random", MethodSettings(eps=EPS, seed=0))
    summary = protect_dataset(dataset, method, protected_dir, command=["mmguard", "demo"],
                              input_fingerprint=fingerprint(dataset))
    click.echo(f"2. protected {summary.finished} images into {protected_dir}")
    record = json.loads((protected_dir / "mmguard-run.json").read_text(encoding="utf-8"))
    worst = 0
    for item in record["items"]:
        original = load_image_uint8(ImageRef(item["key"], path=originals_dir / item["key"]),
                                    item["key"])
        worst = max(worst, linf_levels(original, read_png_uint8(protected_dir / item["file"])))
    click.echo(f"3. re-read all {len(record['items'])} saved PNGs: max |change| {worst}/255 "
               f"(budget {levels(EPS)}/255), mean PSNR {summary.mean_psnr_db:.2f} dB")
    click.echo(f"done in {time.monotonic() - started:.1f} s. Random noise is the control: it "
               "does not make data unlearnable; model-based methods build on this path.")
