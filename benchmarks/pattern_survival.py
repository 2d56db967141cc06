"""How much of a shared noise pattern survives the attacker's transformations? No model.

For each pattern space (per pixel and channel, luma only, on a grid 2 or 4 times
coarser, or of 8 x 8 cells whatever the size (`--cells 8`), bilinear as the engine
upsamples), a random sign pattern at eps is added to
the first IMAGES training images of a set, saved to 8 bits, and put through each of
the attacker's transformations (`mmguard.attack.augment`: Pillow JPEG-75, grayscale,
resize 0.5, Gaussian blur sigma 1), and a resize to a quarter and back: what a model
with a 128-px input keeps of a 512-px image (the real-size sets). The figure is the
share of the pattern's energy still there, along the pattern:
<T(x + p) - T(x), p> / <p, p>, summed over images.
A shortcut an attacker's model can learn after T needs the pattern to survive T;
this is the cheap half of that question (the other half, whether a tower passes the
surviving pattern on, needs attacker runs).

`--release DIR` measures a protected folder instead: its first IMAGES saved files
against their originals (named in its run record), the perturbation being what the
files carry. With it, a second figure per transformation: the energy the
transformation itself adds to the clean images (T(x) - x), per unit of the
perturbation's energy; artefacts as large as the pattern blur what an attacker's
model can read from it, even where the pattern itself survives.

    .venv/bin/python benchmarks/pattern_survival.py [--dataset fashion-mnist] [--images 60]
    .venv/bin/python benchmarks/pattern_survival.py --release runs/lab/bb-sp-c4/protected

Writes benchmarks/results/pattern-survival.json and .md (one row per dataset or release).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from mmguard.attack.augment import gaussian_blur, grayscale, jpeg, resize
from mmguard.data.budget import quantize_within_budget
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float
from mmguard.data.release import RunRecord, read_run_record
from mmguard.errors import MMGuardError
from mmguard.evaluate.audit import recorded_originals
from mmguard.protect.base import group_pattern

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.results_file import load_results, save_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pattern-survival.json"
EPS = 8 / 255
SPACES = {"per pixel, colour": (1, False, 0), "per pixel, luma": (1, True, 0),
          "coarse 2, colour": (2, False, 0), "coarse 2, luma": (2, True, 0),
          "coarse 4, colour": (4, False, 0), "coarse 4, luma": (4, True, 0),
          "8 x 8 cells, luma": (1, True, 8)}
TRANSFORMS = {"jpeg:75": lambda x: jpeg(x, 75), "grayscale": grayscale,
              "resize:0.5": lambda x: resize(x, 0.5), "blur:1": lambda x: gaussian_blur(x, 1.0),
              "resize:0.25": lambda x: resize(x, 0.25)}


def kept_shares(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
                artefacts: bool = False) -> dict[str, float]:
    """Share of the perturbation's energy each transformation keeps along it, over
    (clean, protected) float image pairs; with `artefacts`, also "<name> artefacts": the
    energy of T(clean) - clean per unit of the perturbation's energy."""
    along = dict.fromkeys(TRANSFORMS, 0.0)
    added = dict.fromkeys(TRANSFORMS, 0.0)
    energy = 0.0
    for image, protected in pairs:
        pattern = protected - image
        energy += float((pattern * pattern).sum())
        for name, transform in TRANSFORMS.items():
            clean_after = transform(image)
            along[name] += float(((transform(protected) - clean_after) * pattern).sum())
            added[name] += float(((clean_after - image) ** 2).sum())
    if energy == 0.0:
        raise SystemExit("the protected images equal their originals: nothing to measure")
    shares = {name: round(value / energy, 3) for name, value in along.items()}
    if artefacts:
        shares |= {f"{name} artefacts": round(value / energy, 3) for name, value in added.items()}
    return shares


def survival(images: list[torch.Tensor], coarse: int, gray: bool,
             cells: int = 0) -> dict[str, float]:
    """Share of a sign pattern's energy kept by each transformation, over `images`
    (uint8, as stored); the protected image is saved as the writer saves it."""
    def pairs():
        for index, stored in enumerate(images):
            image = to_float(stored)
            pattern = group_pattern(image, f"image {index}", EPS, seed=0, coarse=coarse,
                                    gray=gray, cells=cells)
            yield image, to_float(quantize_within_budget(stored, image + pattern, EPS))
    return kept_shares(pairs())


def release_survival(folder: Path, count: int,
                     record: RunRecord | None = None) -> dict[str, float]:
    """`kept_shares` (with artefacts) of the first `count` files of a protected folder
    (`record`: its run record, if already read)."""
    record = record or read_run_record(folder)
    originals = recorded_originals(record)
    by_key = originals.records_by_image()

    def pairs():
        for item in record.items[:count]:
            first = originals.records[by_key[item.key][0]]
            image = to_float(load_image_uint8(first.image, first.where))
            yield image, to_float(read_png_uint8(folder / item.file)[:3])
    return kept_shares(pairs(), artefacts=True)


def _cell(kept: dict[str, float], name: str) -> str:
    return f"{kept[name]:.2f}" if name in kept else "—"  # rows from before a column


def write_table(results: dict) -> None:
    lines = ["# How much of a sign pattern at 8/255 survives the attacker's transformations",
             "", "Share of the pattern's energy left along it (1 = all); "
             "`benchmarks/pattern_survival.py`.", ""]
    for dataset, row in results["rows"].items():
        lines += [f"## {dataset} ({row['images']} images, {row['size']} px)", "",
                  "| pattern | " + " | ".join(TRANSFORMS) + " |",
                  "|---|" + "---|" * len(TRANSFORMS)]
        lines += [f"| {space} | " + " | ".join(_cell(kept, t) for t in TRANSFORMS) + " |"
                  for space, kept in row["kept"].items()]
        lines += [f"| {space}: the transformation's own change of the clean images, per "
                  "unit of the perturbation's energy | "
                  + " | ".join(_cell(kept, t + " artefacts") for t in TRANSFORMS) + " |"
                  for space, kept in row["kept"].items()
                  if any(key.endswith(" artefacts") for key in kept)]
        lines.append("")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--release", type=Path, help="a protected folder to measure instead "
                        "of random patterns on --dataset")
    args = parser.parse_args()
    if args.release:
        record = read_run_record(args.release)
        items = record.items[:args.images]
        kept = release_survival(args.release, len(items), record)
        print("  ".join(f"{t} {v:.2f}" for t, v in kept.items()), flush=True)
        first = read_png_uint8(args.release / items[0].file)
        config = record.config
        grid = (f"{config['cells']} x {config['cells']} cells" if config.get("cells")
                else f"coarse {config.get('coarse', 1)}")
        label = (f"{config.get('input')}, {record.method} release ({grid}"
                 f"{', luma' if config.get('gray_noise') else ''}) in {args.release}")
        results = load_results(RESULTS)
        results["rows"][label] = {
            "images": len(items), "size": "x".join(map(str, first.shape[1:])),
            "kept": {"its perturbation": kept}}
        save_results(RESULTS, results, write_table)
        return
    records = load_builtin(args.dataset, "train", "triples").records[:args.images]
    images = [load_image_uint8(r.image, r.image.key) for r in records]
    kept = {space: survival(images, *grid) for space, grid in SPACES.items()}
    for space, row in kept.items():
        print(f"{space:20s} " + "  ".join(f"{t} {v:.2f}" for t, v in row.items()), flush=True)
    results = load_results(RESULTS)
    results["rows"][args.dataset] = {"images": len(images),
                                     "size": "x".join(map(str, images[0].shape[1:])),
                                     "kept": kept}
    save_results(RESULTS, results, write_table)


if __name__ == "__main__":
    try:
        main()
    except MMGuardError as error:  # a bad folder or dataset: its message, not a traceback
        raise SystemExit(f"pattern_survival: {error}") from None
