"""Does a frozen tower see a shared pattern? Decode the pattern's group from its features.

A shortcut works only if the attacker's tower passes the pattern on to what the
attacker trains (the projector and LoRA read the frozen tower's token grid and
pooled token). This probe asks that question alone, apart from the answers: the
first `--train` training images of a set each get the pattern of a group drawn at
random (`--groups` groups, independent of the image, so content cannot give the
group away), saved to 8 bits as the writer saves them; a logistic regression
learns the group from the tower's features and is scored on the next `--held-out`
training images, patterned the same way. Chance is 1/groups; a pattern a tower
ignores stays at chance however faint or strong it is on the pixels.

Pattern spaces are those of `class-pattern` (`mmguard.protect.base.group_pattern`):
a grid of `coarse`-times-coarser or `cells` x `cells` cells, luma or colour, with
sign, uniform, grating or square values (and a prototype, plaid, kept here only).
`--augment SPEC` puts every image through an attacker's transformation first
(`mmguard.attack.augment`), as a transforming attacker would.

Calibration against the LoRA attacker (docs/findings-lvlm.md, session 42): the
luma 8 x 8 sign grid took the ResNet-50 attacker (`smolvlm-lite-d`) 37% below clean
on the 512-px set and the DINOv2 attacker (`smolvlm-lite-c`) 2%; a screen that does
not rank those two apart cannot screen anything else.

    .venv/bin/python benchmarks/pattern_visibility.py --dataset emoji-groups \\
        --tower smolvlm-lite-d --tower smolvlm-lite-c \\
        --pattern luma-cells8-sign --pattern luma-cells16-grating

Pattern names: `<luma|colour>-<cellsN|coarseN>-<sign|uniform|grating|square|plaid>`.
Writes benchmarks/results/pattern-visibility.json and .md (one row per set, tower,
transformation and pattern; re-running a row replaces it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.feature_probe import tower_features  # noqa: E402
from benchmarks.results_file import load_results, save_results  # noqa: E402
from benchmarks.shortcut_probe import held_out_accuracy  # noqa: E402
from mmguard.attack.augment import parse_augment  # noqa: E402
from mmguard.data.budget import quantize_within_budget  # noqa: E402
from mmguard.data.builtin import load_builtin  # noqa: E402
from mmguard.data.images import load_image_uint8, to_float  # noqa: E402
from mmguard.errors import MMGuardError  # noqa: E402
from mmguard.protect.base import NOISE_VALUES, grating, group_pattern  # noqa: E402
from mmguard.protect.pgd import grid_size  # noqa: E402
from mmguard.protect.seeding import item_generator  # noqa: E402
from mmguard.protect.surrogates import create_surrogate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pattern-visibility.json"
# Prototype values, tried here before any joins the library's NOISE_VALUES: a plaid (the
# sign of two gratings' sum: a second orientation might make groups less alike; it was
# read less well through DINOv2 than the square wave, session 42).
PROTOTYPES = ("plaid",)
PATTERN = re.compile(r"^(luma|colour)-(cells|coarse)(\d+)-("
                     + "|".join(NOISE_VALUES + PROTOTYPES) + r")$")


def parse_pattern(name: str) -> dict:
    """`luma-cells8-sign` -> group_pattern's settings; a bad name is a clear error."""
    match = PATTERN.match(name)
    if not match:
        raise MMGuardError(f"pattern {name!r}: expected <luma|colour>-<cellsN|coarseN>-"
                           f"<{'|'.join(NOISE_VALUES + PROTOTYPES)}>, e.g. luma-cells8-sign")
    space, grid, size, values = match.groups()
    size = int(size)
    if size < 1:
        raise MMGuardError(f"pattern {name!r}: the grid size must be at least 1")
    return {"gray": space == "luma", "values": values,
            "cells": size if grid == "cells" else 0, "coarse": size if grid == "coarse" else 1}


def plaid_pattern(image: torch.Tensor, group: str, eps: float, seed: int, gray: bool,
                  values: str, cells: int, coarse: int) -> torch.Tensor:
    """The plaid of `group` for this image, in [-eps, eps]."""
    rows, cols = grid_size(image, coarse, cells)
    shape = (1 if gray else image.shape[0], rows, cols)
    generator = item_generator(seed, f"{group} {shape}")
    wave = grating(shape, tuple(image.shape[-2:]), eps, generator)
    wave = wave + grating(shape, tuple(image.shape[-2:]), eps, generator)
    return (torch.sign(wave) * eps).expand(image.shape)


def pattern_of(image: torch.Tensor, group: str, eps: float, seed: int,
               settings: dict) -> torch.Tensor:
    if settings["values"] in PROTOTYPES:
        return plaid_pattern(image, group, eps, seed, **settings)
    return group_pattern(image, group, eps, seed, **settings)


def patterned(stored: list[torch.Tensor], groups: np.ndarray, settings: dict | None,
              eps: float, seed: int) -> list[torch.Tensor]:
    """Each image plus its group's pattern, saved to 8 bits within the budget (None: clean).
    Kept as uint8: a set of 480 float images of 512 px is 1.5 GB."""
    if settings is None:
        return stored
    released = []
    for image, group in zip(stored, groups, strict=True):
        pixels = to_float(image)
        pattern = pattern_of(pixels, f"group {group}", eps, seed, settings)
        released.append(quantize_within_budget(image, pixels + pattern, eps))
    return released


def visibility(dataset: str, towers: list[str], patterns: list[str], augments: list[str],
               train: int, held_out: int, groups: int, eps: float, seed: int) -> list[dict]:
    records = load_builtin(dataset, "train", "triples").records
    seen, images = set(), []
    for record in records:  # one image per key (several prompts may share it)
        if record.image.key not in seen:
            seen.add(record.image.key)
            images.append(load_image_uint8(record.image, record.image.key))
        if len(images) == train + held_out:
            break
    if len(images) < train + held_out:
        raise SystemExit(f"{dataset} has {len(images)} training images, fewer than "
                         f"--train {train} + --held-out {held_out}")
    labels = np.random.default_rng(seed).integers(0, groups, size=len(images))
    patterns = {"none (clean)": None} | {name: parse_pattern(name) for name in patterns}
    surrogates = {tower: create_surrogate([tower]) for tower in towers}
    rows = []
    for name, settings in patterns.items():  # one set in memory at a time
        stored_set = patterned(images, labels, settings, eps, seed)
        for tower, surrogate in surrogates.items():
            for augment in augments:
                pipeline = parse_augment(augment)
                transform = torch.Generator().manual_seed(seed)
                features = tower_features(surrogate, [pipeline(to_float(x), transform)
                                                      for x in stored_set]).numpy()
                accuracy = held_out_accuracy(features[:train], labels[:train],
                                             features[train:], labels[train:])
                rows.append({"dataset": dataset, "size": list(images[0].shape[-2:]),
                             "tower": tower, "augment": pipeline.spec, "pattern": name,
                             "accuracy": round(accuracy, 4), "chance": round(1 / groups, 4),
                             "train": train, "held_out": held_out, "seed": seed})
                print(f"{tower} {pipeline.spec} {name}: {100 * accuracy:.1f}% "
                      f"(chance {100 / groups:.1f}%)", flush=True)
    return rows


def write_table(results: dict) -> None:
    lines = ["# Does a frozen tower see a shared pattern?", "",
             "Held-out accuracy of a linear classifier that reads a pattern's group "
             "(drawn at random per image) from the tower's features; chance = 1/groups. "
             "`benchmarks/pattern_visibility.py`.", "",
             "| set | tower | attacker transformation | pattern (8/255) | accuracy % | "
             "chance % | train / held out |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"].values():
        lines.append(f"| {row['dataset']} ({row['size'][0]} px) | {row['tower']} | "
                     f"{row['augment']} | {row['pattern']} | {100 * row['accuracy']:.1f} | "
                     f"{100 * row['chance']:.1f} | {row['train']} / {row['held_out']} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="emoji-groups")
    parser.add_argument("--tower", action="append", required=True)
    parser.add_argument("--pattern", action="append", required=True)
    parser.add_argument("--augment", action="append", default=None)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--held-out", type=int, default=240)
    parser.add_argument("--groups", type=int, default=9)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 beside a running benchmark)")
    args = parser.parse_args()
    try:
        for name in args.pattern:
            parse_pattern(name)
        for spec in args.augment or []:
            parse_augment(spec)
    except MMGuardError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    rows = visibility(args.dataset, args.tower, args.pattern, args.augment or ["none"],
                      args.train, args.held_out, args.groups, args.eps, args.seed)
    results = load_results(RESULTS)
    for row in rows:
        key = " | ".join((row["dataset"], row["tower"], row["augment"], row["pattern"]))
        results["rows"][key] = row
    save_results(RESULTS, results, write_table)


if __name__ == "__main__":
    main()
