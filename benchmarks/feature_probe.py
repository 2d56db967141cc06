"""Does a wrong-target release still move the features where an attacker looks?

A two-minute screen before a ten-minute attacker run. For a wrong-target release
(its work folder keeps `targets.json`: each image's target image), this passes
the clean and the protected training images through a frozen vision tower,
after each attacker transformation, and reports

- moved: how far the features went from the image's own clean features toward
  its target image's clean features, the projection on that line as a share of
  the whole way (0 = not moved, 1 = at the target), mean over images;
- at_target / at_own: the share of images whose nearest group centroid (centroids
  of the transformed clean images; groups are the answers of triples, the
  release's k-means clusters of pairs) is the target group / their own group.

The tower can be the surrogate's (white box) or another one (black box: does the
move transfer?). `--batch-statistics` reads the features as an attacker's training
forward does, BatchNorm normalising each shuffled batch of 64 by its own statistics
(does a tower that fine-tunes still see the move while it trains?).

The first-order prediction, which the attacker rows check, is that an attacker
fed these images learns the wrong class in proportion to `at_target`, as on the
white-box row.

    .venv/bin/python benchmarks/feature_probe.py --release runs/lab/wt-eot-jpeg/protected \\
        --dataset fashion-mnist --tower smolvlm-lite --tower smolvlm-lite-c \\
        --augment none --augment jpeg:75 --out runs/lab/probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmguard.attack.augment import parse_augment
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, read_png_uint8, to_float
from mmguard.protect.grouping import answer_groups
from mmguard.protect.surrogates import create_surrogate

BATCH = 32
TRAINING_BATCH = 64  # the lab's LiT attackers' batch


def tower_features(surrogate, images: list[torch.Tensor],
              batch_statistics: bool = False) -> torch.Tensor:
    # Batch statistics depend on who shares the batch: a seeded shuffle, as in training.
    size = TRAINING_BATCH if batch_statistics else BATCH
    order = (torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
             if batch_statistics else torch.arange(len(images)))
    chunks = []
    with torch.no_grad(), surrogate.perturbation_mode(batch_statistics):
        for start in range(0, len(images), size):
            chunk = order[start:start + size].tolist()
            chunks.append(surrogate.image_features([images[i] for i in chunk]).cpu())
    features = torch.empty(len(images), chunks[0].shape[1])
    features[order] = torch.cat(chunks)
    return features


def probe(release: Path, dataset: str, tower: str, augment: str,
          kind: str = "triples", batch_statistics: bool = False) -> dict[str, float]:
    targets = json.loads((release / ".mmguard" / "work" / "targets.json").read_text())
    target_image_of = targets["target_image_of"]
    records = {r.image.key: r for r in load_builtin(dataset, "train", kind).records}
    keys = [key for key in target_image_of if key in records]
    pipeline = parse_augment(augment)
    generator = torch.Generator().manual_seed(0)

    def transformed(image: torch.Tensor) -> torch.Tensor:
        return pipeline(image, generator) if augment != "none" else image

    clean = [transformed(to_float(load_image_uint8(records[k].image, k))) for k in keys]
    protected = [transformed(to_float(torch.as_tensor(
        read_png_uint8(release / "images" / Path(k).name)[:3]))) for k in keys]
    surrogate = create_surrogate([tower])
    clean_f = tower_features(surrogate, clean, batch_statistics)
    protected_f = tower_features(surrogate, protected, batch_statistics)
    index = {k: i for i, k in enumerate(keys)}
    target_f = clean_f[[index[target_image_of[k]] for k in keys]]
    line = target_f - clean_f
    moved = ((protected_f - clean_f) * line).sum(1) / line.pow(2).sum(1).clamp(min=1e-12)
    # The release's own groups: its answers (triples) or its k-means clusters (pairs).
    groups = targets.get("group_of") or dict(zip(keys, answer_groups(
        keys, {k: records[k].response for k in keys}), strict=True))
    labels = torch.tensor([groups[k] for k in keys])
    centroids = torch.stack([clean_f[labels == g].mean(0) for g in range(int(labels.max()) + 1)])
    nearest = torch.cdist(protected_f, centroids).argmin(1)
    target_labels = labels[[index[target_image_of[k]] for k in keys]]
    clean_nearest = torch.cdist(clean_f, centroids).argmin(1)
    return {"moved": float(moved.mean()),
            "at_target": float((nearest == target_labels).float().mean()),
            "at_own": float((nearest == labels).float().mean()),
            "clean_at_own": float((clean_nearest == labels).float().mean()),
            "images": len(keys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, action="append", required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--kind", choices=("triples", "pairs"), default="triples")
    parser.add_argument("--tower", action="append", required=True)
    parser.add_argument("--augment", action="append", default=None)
    parser.add_argument("--batch-statistics", action="store_true",
                        help="BatchNorm on each batch's statistics, as while an attacker trains")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for release in args.release:
        for tower in args.tower:
            for augment in args.augment or ["none"]:
                row = {"release": str(release), "tower": tower, "augment": augment,
                       "batch_statistics": args.batch_statistics,
                       **probe(release, args.dataset, tower, augment, args.kind,
                               args.batch_statistics)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
