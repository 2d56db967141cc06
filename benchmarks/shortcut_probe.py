"""Would an attacker on this tower learn the answers from the release or from the content?

A one-minute stand-in for an LVLM attacker run, for screening releases against
towers that were not in the loop (the black box). For a release of the first
`--limit` training triples, it reads three training sets through each frozen
vision tower: the clean images, uniform noise in the same ball (seeded), and the
released images; fits a linear classifier of the answer on each (standardised
features, multinomial logistic regression); and scores all three on clean
held-out training images (the `--held-out` images after the release's), which a
protection never saw. An attacker who fine-tunes a projector and LoRA on a frozen
tower reads the same features; if the release carries a shortcut that tower sees,
its classifier leans on it and fails on clean images, as the LoRA attacker does.

Reported per tower: held-out accuracy after training on clean / uniform / release,
and the release's drop relative to the better control. The LoRA attacker rows
check the prediction; this probe only ranks releases.

`--augment SPEC` (repeatable; `none` is the plain row) puts all three training sets
through an attacker's transformation (`mmguard.attack.augment`, e.g. jpeg:75)
before the tower reads them, as `mmguard lab --augment` does to the attacker's data;
the held-out images stay clean. Comparing a release's drop under SPEC with its drop
under `none` says how much of the shortcut the tower still sees after it.

    .venv/bin/python benchmarks/shortcut_probe.py --release runs/cp/protected \\
        --tower smolvlm-lite --tower smolvlm-lite-c [--augment none --augment jpeg:75] \
        --out runs/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.feature_probe import tower_features  # noqa: E402
from mmguard.attack.augment import parse_augment  # noqa: E402
from mmguard.data.budget import project_to_ball  # noqa: E402
from mmguard.data.builtin import load_builtin  # noqa: E402
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float  # noqa: E402
from mmguard.errors import MMGuardError  # noqa: E402
from mmguard.protect.grouping import answer_groups  # noqa: E402
from mmguard.protect.surrogates import create_surrogate  # noqa: E402


def held_out_accuracy(train: np.ndarray, labels: np.ndarray, test: np.ndarray,
                      test_labels: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    classifier.fit(train, labels)
    return float((classifier.predict(test) == test_labels).mean())


def read_release(release: Path, train: list, dataset: str, limit: int) -> list[torch.Tensor]:
    images = []
    for record in train:
        path = release / "images" / Path(record.image.key).name
        if not path.exists():
            raise SystemExit(f"{path}: not in the release (protect the first {limit} "
                             f"training triples of {dataset})")
        images.append(to_float(torch.as_tensor(read_png_uint8(path)[:3])))
    return images


def probe(releases: list[Path], dataset: str, limit: int, held_out: int, towers: list[str],
          eps: float, seed: int, augments: tuple[str, ...] = ("none",)) -> list[dict]:
    """One row per release, tower and transformation; the controls are read once per
    tower and transformation."""
    records = load_builtin(dataset, "train", "triples").records
    if len(records) < limit + held_out:
        raise SystemExit(f"{dataset} has {len(records)} training triples, fewer than "
                         f"--limit {limit} + --held-out {held_out}")
    train, test = records[:limit], records[limit:limit + held_out]
    released = {release: read_release(release, train, dataset, limit) for release in releases}
    groups = answer_groups([r.image.key for r in records[:limit + held_out]],
                           {r.image.key: r.response for r in records[:limit + held_out]})
    labels, test_labels = np.array(groups[:limit]), np.array(groups[limit:])
    clean = [to_float(load_image_uint8(r.image, r.image.key)) for r in train]
    generator = torch.Generator().manual_seed(seed)
    uniform = [project_to_ball(x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps,
                               x, eps) for x in clean]
    held = [to_float(load_image_uint8(r.image, r.image.key)) for r in test]
    sets = (("clean", clean), ("uniform", uniform), *released.items())
    rows = []
    for tower in towers:
        surrogate = create_surrogate([tower])
        test_f = tower_features(surrogate, held)
        for augment in augments:
            pipeline = parse_augment(augment)
            transform = torch.Generator().manual_seed(seed)  # only crop-flip draws from it
            scores = {name: held_out_accuracy(
                tower_features(surrogate, [pipeline(x, transform) for x in images]), labels,
                test_f, test_labels) for name, images in sets}
            controls = {"clean": scores["clean"], "uniform": scores["uniform"]}
            for release in releases:
                score = scores[release]
                rows.append({"path": str(release), "tower": tower, "augment": pipeline.spec,
                             **controls, "release": score,
                             "relative_drop": 1 - score / max(controls.values()),
                             "train": limit, "held_out": held_out})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, action="append", required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=240, help="triples in the release")
    parser.add_argument("--held-out", type=int, default=600,
                        help="clean training triples after the release's, scored")
    parser.add_argument("--tower", action="append", required=True)
    parser.add_argument("--augment", action="append", default=None,
                        help="attacker transformation of the training sets (repeatable; "
                        "none: as released)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # beside a running benchmark; features are cheap
    for spec in args.augment or []:
        try:
            parse_augment(spec)  # a bad spec is named before any tower is loaded
        except MMGuardError as error:
            parser.error(str(error))
    rows = probe(args.release, args.dataset, args.limit, args.held_out, args.tower, args.eps,
                 args.seed, tuple(args.augment or ["none"]))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
