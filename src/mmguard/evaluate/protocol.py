"""The evaluation protocol: train an attacker on (protected) data, test on clean data.

    report = evaluate_contrastive(train, test, recipe, seeds=[0, 1, 2], baseline=clean_train)

Each training set is trained once per seed; retrieval on the clean test set
is reported per seed and as mean and standard deviation, next to the random-
guess level for that test set and, with a clean baseline, the degradation.

The pieces both attacker families share live here too: checking that data
(named through `mmguard.data.resolve`) fits the attacker, choosing which images
go back to clean (`clean_swaps`), and the per-seed loop and its statistics;
`lvlm_protocol.py` is the same protocol for LVLM attackers, and `attacker.py`
runs either from named data (`mmguard evaluate`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from mmguard.attack.contrastive import (
    AttackerRecipe,
    ImageCaptionSet,
    caption_rows,
    load_pairs,
    train_attacker,
)
from mmguard.data.records import Dataset, Kind
from mmguard.data.release import output_image_paths, per_caption_images, released_per_caption
from mmguard.errors import MMGuardError
from mmguard.evaluate.retrieval import degradation, evaluate_retrieval

METRICS = ("R@1", "R@5", "R@10", "MedR")




def require_kind(dataset: Dataset, kind: Kind, attacker: str) -> Dataset:
    """Stop early, naming both sides, when data and attacker do not fit together."""
    if dataset.kind != kind:
        wants = {"pairs": "image-caption pairs", "triples": "(image, prompt, response) triples"}
        raise MMGuardError(f"{dataset.source} holds {wants[dataset.kind]}, but the attacker "
                           f"{attacker} trains on {wants[kind]}; give {kind} data or an "
                           f"attacker for {dataset.kind} (contrastive models take pairs, "
                           "LVLMs take triples)")
    return dataset


def clean_swaps(protected_dataset: Dataset, clean_dataset: Dataset, fraction: float,
                seed: int, limit: int | None = None) -> list[tuple[int, int]]:
    """(protected image index, clean image index) pairs: the images to swap back to clean.

    Images are matched by the path the protect command gives each clean image,
    so a protected folder and the manifest it was made from pair up exactly.
    Indices follow `records_by_image` order; only the first `limit` protected
    images are candidates. Models an attacker holding only partly protected
    data (MEM's 100/50/20%).

    A release made per caption row (`released_per_caption`) holds an image once
    per row; its indices are then rows, the clean side's in the order of
    `per_caption_images(clean_dataset)` (as `caption_rows` lays the clean set
    out). `fraction` still counts original images: all the rows of a chosen
    image go back to clean together, as an owner protecting part of a dataset
    would release an image either clean or protected, never both.
    """
    if not 0.0 <= fraction <= 1.0:
        raise MMGuardError(f"--mix-clean fraction {fraction} is outside [0, 1]")
    per_caption = released_per_caption(protected_dataset)
    layout = per_caption_images(clean_dataset) if per_caption else clean_dataset
    by_output = {path: index for index, path in enumerate(output_image_paths(layout).values())}
    # The original image of every clean item, by index: rows share their image's key.
    owner = ([record.image.key for record in clean_dataset.records for _ in record.texts()]
             if per_caption else list(clean_dataset.records_by_image()))
    protected_paths = list(protected_dataset.records_by_image())[:limit]
    matches = [(i, by_output.get(key)) for i, key in enumerate(protected_paths)]
    matched = [(i, j) for i, j in matches if j is not None]
    if not matched:
        layout_name = "per caption row" if per_caption else "per image"
        raise MMGuardError(f"--mix-clean: no protected image matches an image of the clean set "
                           f"(released {layout_name})")
    units: dict[str, list[tuple[int, int]]] = {}
    for i, j in matched:
        units.setdefault(owner[j], []).append((i, j))
    groups = list(units.values())
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(groups), generator=generator).tolist()
    return [pair for k in order[: round(fraction * len(groups))] for pair in groups[k]]


def mix_clean(protected: ImageCaptionSet, protected_dataset: Dataset, clean_dataset: Dataset,
              fraction: float, seed: int) -> ImageCaptionSet:
    """Replace `fraction` of the protected images (and captions) by their clean originals
    (every row of them, in a release made per caption row: see `clean_swaps`)."""
    swaps = clean_swaps(protected_dataset, clean_dataset, fraction, seed)
    clean = load_pairs(clean_dataset)
    if released_per_caption(protected_dataset):
        clean = caption_rows(clean, clean_dataset)
    images, captions = list(protected.images), list(protected.captions)
    for i, j in swaps:
        images[i], captions[i] = clean.images[j], clean.captions[j]
    return ImageCaptionSet(images, captions, list(protected.keys))


def over_seeds(seeds: list[int], run_one, describe, label: str, log=print) -> list[dict]:
    """`run_one(seed) -> metrics` for every seed, each timed and logged as `describe(metrics)`."""
    runs = []
    for seed in seeds:
        started = time.monotonic()
        metrics = run_one(seed)
        metrics.update(seed=seed, seconds=round(time.monotonic() - started, 1))
        runs.append(metrics)
        log(f"{label} seed {seed}: {describe(metrics)} ({metrics['seconds']:.0f} s)")
    return runs


def population_std(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def mean_std_cell(mean: float, std: float, runs: int, digits: int = 1) -> str:
    """"m ± s" over several seeds, just "m" for one."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if runs > 1 else f"{mean:.{digits}f}"


def run_seeds(train: ImageCaptionSet, test: ImageCaptionSet, recipe: AttackerRecipe,
              seeds: list[int], label: str, log=print) -> dict:
    def run_one(seed: int) -> dict:
        model, losses = train_attacker(train, replace(recipe, seed=seed))
        metrics = evaluate_retrieval(model, test, test_batchnorm=recipe.test_batchnorm)
        metrics["final_train_loss"] = round(losses[-1], 4)
        return metrics

    def describe(m: dict) -> str:
        return (f"i2t R@10 {m['i2t']['R@10']:.1f} MedR {m['i2t']['MedR']:.0f}, "
                f"t2i R@10 {m['t2i']['R@10']:.1f} MedR {m['t2i']['MedR']:.0f}")

    runs = over_seeds(seeds, run_one, describe, label, log)
    return {"runs": runs, "mean": _aggregate(runs, statistics.mean),
            "std": _aggregate(runs, population_std), "random": runs[0]["random"]}


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
    """The report of `evaluate_contrastive` as a table: clean and given rows, random level."""
    rows = {"clean": report.get("clean"), "given --train": report["protected"]}
    return retrieval_table({label: result for label, result in rows.items() if result},
                           report["protected"]["random"])


def retrieval_table(rows: dict[str, dict], random_level: dict,
                    metrics: tuple[str, ...] = METRICS) -> str:
    """A row per training data (label -> `run_seeds` result: mean ± std over seeds), both
    directions, and the random-guess level last."""
    header = ("| training data | " + " | ".join(f"i→t {m}" for m in metrics) + " | "
              + " | ".join(f"t→i {m}" for m in metrics) + " |")
    lines = [header, "|" + "---|" * (1 + 2 * len(metrics))]
    for label, result in rows.items():
        cells = [mean_std_cell(result["mean"][d][m], result["std"][d][m], len(result["runs"]))
                 for d in ("i2t", "t2i") for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{random_level[d][m]:.1f}" for d in ("i2t", "t2i") for m in metrics]
    lines.append("| random guess | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrastive_summary(report: dict) -> str | None:
    """One line on how much protection cost the attacker, when there is a clean baseline."""
    if "degradation" not in report:
        return None
    deg = report["degradation"]
    return (f"degradation of R@10: i→t {percent(deg['i2t']['R@10'])}, "
            f"t→i {percent(deg['t2i']['R@10'])}; MedR x{deg['i2t']['MedR_ratio']:.2f} "
            f"/ x{deg['t2i']['MedR_ratio']:.2f}")


def percent(fraction: float | None) -> str:
    """A fraction as a whole percentage ("n/a" when undefined)."""
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"
