"""The evaluation protocol: train an attacker on (protected) data, test on clean data.

    report = evaluate_contrastive(train, test, recipe, seeds=[0, 1, 2], baseline=clean_train)

Each training set is trained once per seed; retrieval on the clean test set
is reported per seed and as mean and standard deviation, next to the random-
guess level for that test set and, with a clean baseline, the degradation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmguard.attack.contrastive import (
    AttackerRecipe,
    ImageCaptionSet,
    evaluate_retrieval,
    load_pairs,
    train_attacker,
)
from mmguard.data.builtin import BUILTINS, load_builtin
from mmguard.data.records import Dataset
from mmguard.data.sources import read_dataset
from mmguard.errors import MMGuardError
from mmguard.evaluate.retrieval import degradation
from mmguard.protect.output import output_image_paths

METRICS = ("R@1", "R@5", "R@10", "MedR")


def resolve_dataset(spec: str) -> Dataset:
    """A manifest path, or NAME:SPLIT for a built-in dataset (e.g. emoji:test)."""
    path = Path(spec)
    if path.exists():
        return read_dataset(path)
    name, _, split = spec.partition(":")
    if name in BUILTINS and split:
        return load_builtin(name, split, "pairs")
    raise MMGuardError(f"{spec!r} is neither an existing manifest nor NAME:SPLIT of a built-in "
                       f"dataset ({', '.join(BUILTINS)})")


def mix_clean(protected: ImageCaptionSet, protected_dataset: Dataset, clean_dataset: Dataset,
              fraction: float, seed: int) -> ImageCaptionSet:
    """Replace `fraction` of the protected images by their clean originals.

    Images are matched by the path the protect command gives each clean image,
    so a protected folder and the manifest it was made from pair up exactly.
    Models an attacker holding only partly protected data (MEM's 100/50/20%).
    """
    if not 0.0 <= fraction <= 1.0:
        raise MMGuardError(f"--mix-clean fraction {fraction} is outside [0, 1]")
    clean = load_pairs(clean_dataset)
    by_output = {path: index for index, path in
                 enumerate(output_image_paths(clean_dataset).values())}
    protected_paths = list(protected_dataset.records_by_image())
    matches = [(i, by_output.get(key)) for i, key in enumerate(protected_paths)]
    matched = [(i, j) for i, j in matches if j is not None]
    if not matched:
        raise MMGuardError("--mix-clean: no protected image matches an image of the clean set")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(matched), generator=generator).tolist()
    chosen = [matched[k] for k in order[: round(fraction * len(matched))]]
    images, captions = list(protected.images), list(protected.captions)
    for i, j in chosen:
        images[i], captions[i] = clean.images[j], clean.captions[j]
    return ImageCaptionSet(images, captions, list(protected.keys))


def run_seeds(train: ImageCaptionSet, test: ImageCaptionSet, recipe: AttackerRecipe,
              seeds: list[int], label: str, log=print) -> dict:
    runs = []
    for seed in seeds:
        started = time.monotonic()
        model, losses = train_attacker(train, replace(recipe, seed=seed))
        metrics = evaluate_retrieval(model, test)
        metrics.update(seed=seed, final_train_loss=round(losses[-1], 4),
                       seconds=round(time.monotonic() - started, 1))
        runs.append(metrics)
        log(f"{label} seed {seed}: i2t R@10 {metrics['i2t']['R@10']:.1f} MedR "
            f"{metrics['i2t']['MedR']:.0f}, t2i R@10 {metrics['t2i']['R@10']:.1f} MedR "
            f"{metrics['t2i']['MedR']:.0f} ({metrics['seconds']:.0f} s)")
    return {"runs": runs, "mean": _aggregate(runs, statistics.mean),
            "std": _aggregate(runs, lambda v: statistics.pstdev(v) if len(v) > 1 else 0.0),
            "random": runs[0]["random"]}


def _aggregate(runs: list[dict], reduce) -> dict:
    return {d: {m: reduce([r[d][m] for r in runs]) for m in METRICS} for d in ("i2t", "t2i")}


def evaluate_contrastive(train: ImageCaptionSet, test: ImageCaptionSet, recipe: AttackerRecipe,
                         seeds: list[int], baseline: ImageCaptionSet | None = None,
                         log=print) -> dict:
    report = {"attacker": {k: v for k, v in vars(recipe).items() if k != "augment"},
              "augment": recipe.augment.spec if recipe.augment else None, "seeds": seeds,
              "test": {"images": len(test.images),
                       "captions": sum(len(c) for c in test.captions)}}
    if baseline is not None:
        report["clean"] = run_seeds(baseline, test, recipe, seeds, "clean", log)
    report["protected"] = run_seeds(train, test, recipe, seeds, "train", log)
    if baseline is not None:
        report["degradation"] = degradation(report["clean"]["mean"], report["protected"]["mean"])
    return report


def markdown_table(report: dict) -> str:
    header = ("| training data | " + " | ".join(f"i→t {m}" for m in METRICS) + " | "
              + " | ".join(f"t→i {m}" for m in METRICS) + " |")
    lines = [header, "|" + "---|" * (1 + 2 * len(METRICS))]
    rows = [("clean", report.get("clean")), ("given --train", report["protected"])]
    for label, result in rows:
        if result is None:
            continue
        cells = [_cell(result, d, m) for d in ("i2t", "t2i") for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    random_level = report["protected"]["random"]
    cells = [f"{random_level[d][m]:.1f}" for d in ("i2t", "t2i") for m in METRICS]
    lines.append("| random guess | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(result: dict, direction: str, metric: str) -> str:
    mean, std = result["mean"][direction][metric], result["std"][direction][metric]
    return f"{mean:.1f} ± {std:.1f}" if len(result["runs"]) > 1 else f"{mean:.1f}"
