"""What would a frozen-tower attacker learn if a release moved the features *exactly* so?

The `lit:projection` attacker trains only linear heads on a frozen image tower,
so everything it can learn from a release is in the tower's features of the
released images. This screen trains those heads (the lab's recipe: 10 epochs,
AdamW lr 1e-3, weight decay 0.2, batch 64, warmup-cosine) on cached features
and scores them on the clean test split (or, to screen, on the lab's clean
validation slice: `--validation-of N`), for training features that are

- clean / release: the clean images' features, and a real release's;
- toward target a: each image's features moved a share a of the way to its
  wrong target image's (the release's targets.json), a = 1 a perfect collision;
- collapse a: every image's features moved a share a toward the mean of all;
- cluster code b: clean features plus b times a random unit code of its k-means
  cluster (a class-wise shortcut in feature space, b in units of the features'
  RMS distance to their mean).

It runs in seconds per variant, so it bounds what any pixel perturbation of
that kind could do against this attacker before any protect run; the attacker
rows check the bound. Features are cached in OUT.features.pt.

    .venv/bin/python benchmarks/feature_bound.py --release runs/lab/scenes-test/protected \\
        --dataset emoji-scenes --out runs/lab/feature-bound-scenes.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from mmguard.attack.contrastive import load_pairs
from mmguard.data.builtin import load_builtin
from mmguard.data.release import output_image_paths
from mmguard.data.sources import read_dataset
from mmguard.evaluate.retrieval import retrieval_metrics
from mmguard.lab import hold_out
from mmguard.models.contrastive import info_nce
from mmguard.models.registry import create_contrastive_model
from mmguard.models.training import Trainer

BATCH = 64


def _image_features(model, images) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH):
            chunk = torch.cat([model.preprocess.resize_crop(image[None])
                               for image in images[start:start + BATCH]])
            out.append(model.image_tower_features(model.preprocess.normalize(chunk)))
    return torch.cat(out)


def _text_features(model, captions: list[str]) -> torch.Tensor:
    """The frozen text tower's pooled features (what the text head sees)."""
    with torch.no_grad():
        return torch.cat([model.text_tower_features(model.tokenize(captions[start:start + BATCH]))
                          for start in range(0, len(captions), BATCH)])


def cached_features(releases: dict[str, Path], dataset: str, model_name: str,
                    cache: Path, validation_of: int | None) -> dict:
    """Features of the clean training images, of each release, and of the scoring set:
    the test split, or (validation_of=N) the lab's clean held-out 20% of the first N
    training images, whose other 80% the release must hold."""
    if cache.exists():
        return torch.load(cache)
    model = create_contrastive_model(model_name, None, "cpu").eval()
    trained = load_builtin(dataset, "train", "pairs")
    if validation_of is None:
        test = load_pairs(load_builtin(dataset, "test", "pairs"))
    else:
        trained, held = hold_out(trained, validation_of, 0.2)
        test = load_pairs(held)
    clean = load_pairs(trained)
    loaded = {name: load_pairs(read_dataset(path / "manifest.csv"))
              for name, path in releases.items()}
    released = loaded["release"]
    # The clean images in the release's order (a lab release holds its training part).
    paths = output_image_paths(trained)
    index = {paths[key]: i for i, key in enumerate(clean.keys)}
    missing = [key for key in released.keys if key not in index]
    if missing:
        raise SystemExit(f"{missing[0]} of the release is not a training image here"
                         + (" (use --validation-of N for a screening release)"
                            if validation_of is None else ""))
    order = [index[key] for key in released.keys]
    features = {
        "clean": _image_features(model, [clean.images[i] for i in order]),
        **{name: _image_features(model, data.images) for name, data in loaded.items()},
        "test_images": _image_features(model, test.images),
        "train_text": _text_features(model, [clean.captions[i][0] for i in order]),
        "test_text": _text_features(model, [c[0] for c in test.captions]),
        "keys": [Path(k).name for k in released.keys],
    }
    torch.save(features, cache)
    return features


def train_heads(image_f: torch.Tensor, text_f: torch.Tensor, seed: int, epochs: int = 10,
                lr: float = 1e-3) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    image_head = torch.nn.Linear(image_f.shape[1], 256)
    text_head = torch.nn.Linear(text_f.shape[1], 256)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    steps = epochs * math.ceil(len(image_f) / BATCH)
    trainer = Trainer([*image_head.parameters(), *text_head.parameters(), scale], lr, 0.2,
                      steps, int(0.1 * steps))
    rng = random.Random(seed)
    order = list(range(len(image_f)))
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            if len(batch) < 2:
                continue
            img = F.normalize(image_head(image_f[batch]), dim=-1)
            txt = F.normalize(text_head(text_f[batch]), dim=-1)
            trainer.step(info_nce(scale.exp().clamp(max=100) * img @ txt.T))
    return image_head, text_head


def score(heads, features: dict) -> dict[str, float]:
    image_head, text_head = heads
    with torch.no_grad():
        metrics = retrieval_metrics(image_head(features["test_images"]),
                                    text_head(features["test_text"]),
                                    torch.arange(len(features["test_text"])))
    return {"i2t R@10": metrics["i2t"]["R@10"], "i2t MedR": metrics["i2t"]["MedR"],
            "t2i R@10": metrics["t2i"]["R@10"], "t2i MedR": metrics["t2i"]["MedR"]}


def variants(features: dict, release: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The real releases' features, then the idealised moves (wrong-target releases only:
    they need the release's targets and groups)."""
    clean = features["clean"]
    out = {"clean": clean, **{name: features[name] for name in names}}
    path = release / ".mmguard" / "work" / "targets.json"
    if not path.exists():
        return out
    targets = json.loads(path.read_text())
    index = {k: i for i, k in enumerate(features["keys"])}
    target = clean[[index[targets["target_image_of"][k]] for k in features["keys"]]]
    mean = clean.mean(0, keepdim=True)
    rms = (clean - mean).pow(2).sum(1).mean().sqrt()
    group = torch.tensor([targets["group_of"][k] for k in features["keys"]])
    generator = torch.Generator().manual_seed(0)
    codes = F.normalize(torch.randn(int(group.max()) + 1, clean.shape[1], generator=generator),
                        dim=1)
    for share in (0.5, 0.84, 0.95, 1.0):
        out[f"toward target {share}"] = clean + share * (target - clean)
    for share in (0.84, 0.95):
        out[f"collapse {share}"] = clean + share * (mean - clean)
    for size in (0.5, 1.0, 2.0):
        out[f"cluster code {size}"] = clean + size * rms * codes[group]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--control", action="append", default=[], metavar="NAME=PATH",
                        help="another release of the same images (e.g. uniform=runs/.../uniform)")
    parser.add_argument("--dataset", default="emoji-scenes")
    parser.add_argument("--model", default="lit")
    parser.add_argument("--validation-of", type=int, default=None, metavar="N",
                        help="score on the lab's held-out 20%% of the first N training images "
                             "(screening; the default scores on the test split)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    releases = {"release": args.release,
                **{c.split("=", 1)[0]: Path(c.split("=", 1)[1]) for c in args.control}}
    features = cached_features(releases, args.dataset, args.model,
                               args.out.with_suffix(".features.pt"), args.validation_of)
    seeds = [int(s) for s in args.seeds.split(",")]
    n_test = len(features["test_text"])
    results = {"n_train": len(features["clean"]), "n_test": n_test, "rows": {}}
    where = "test" if args.validation_of is None else "validation"
    print(f"{len(features['clean'])} training images, {n_test} {where} images "
          f"(random MedR about {n_test // 2})")
    for name, train in variants(features, args.release, list(releases)).items():
        runs = [score(train_heads(train, features["train_text"], seed), features)
                for seed in seeds]
        mean = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
        results["rows"][name] = {"mean": mean, "runs": runs}
        print(f"{name:22s} " + "  ".join(f"{k} {v:6.1f}" for k, v in mean.items()), flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
