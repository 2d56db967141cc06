"""How much of a feature collision can survive real JPEG-75? A micro-screen on 48 images.

PGD on the wrong-target collision loss of `smolvlm-lite`'s tower (targets from a
wrong-target release's targets.json), the result saved to 8 bits, then the move
toward the target measured before and after Pillow's JPEG-75 (as in
feature_probe.py). Variants: no EOT, every step through the differentiable JPEG,
the mean of both, luma-only noise, more steps. EPS=16 in the environment for 16/255.

    EPS=8 .venv/bin/python benchmarks/jpeg_eot_micro.py runs/lab/scr-plain/protected plain jpeg-only
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mmguard.attack.augment import jpeg as real_jpeg
from mmguard.data.budget import quantize_within_budget
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, to_float
from mmguard.protect.pgd import pgd
from mmguard.protect.robust import jpeg
from mmguard.protect.surrogates import create_surrogate

IMAGES = 48


def main(release: Path, names: list[str]) -> None:
    eps = float(os.environ.get("EPS", "8")) / 255
    records = {r.image.key: r for r in load_builtin("fashion-mnist", "train", "triples").records}
    targets = json.loads((release / ".mmguard" / "work" / "targets.json").read_text())
    keys = list(targets["target_image_of"])[:IMAGES]
    surrogate = create_surrogate(["smolvlm-lite"])

    def load(key: str) -> torch.Tensor:
        return to_float(load_image_uint8(records[key].image, key))

    originals = [load(k) for k in keys]

    def features(images: list[torch.Tensor]) -> torch.Tensor:
        return surrogate.image_features(images)

    with torch.no_grad(), surrogate.perturbation_mode(False):
        wanted = features([load(targets["target_image_of"][k]) for k in keys])

    def moved(images: list[torch.Tensor], transform) -> float:
        with torch.no_grad(), surrogate.perturbation_mode(False):
            clean = features([transform(x) for x in originals])
            protected = features([transform(x) for x in images])
        line = wanted - clean
        return float((((protected - clean) * line).sum(1) / line.pow(2).sum(1)).mean())

    def collision(images: list[torch.Tensor]) -> torch.Tensor:
        return (features(images) - wanted).pow(2).sum(1).mean()

    def through_jpeg(images: list[torch.Tensor]) -> torch.Tensor:
        return collision([jpeg(x) for x in images])

    variants = {  # name: (loss, gray noise, steps)
        "plain": (collision, False, 40),
        "jpeg-only": (through_jpeg, False, 40),
        "mean-none-jpeg": (lambda ims: 0.5 * collision(ims) + 0.5 * through_jpeg(ims), False, 40),
        "jpeg-only-gray": (through_jpeg, True, 40),
        "jpeg-only-120": (through_jpeg, False, 120),
    }
    for name in names or list(variants):
        loss, gray, steps = variants[name]
        with surrogate.perturbation_mode(False):
            deltas = pgd(originals, [torch.zeros_like(x) for x in originals], loss, eps=eps,
                         step_size=1 / 255, steps=steps, gray=gray)
        saved = [quantize_within_budget((x * 255).round().to(torch.uint8), x + d, eps).float()
                 / 255 for x, d in zip(originals, deltas, strict=True)]
        print(json.dumps({"variant": name, "eps_levels": round(eps * 255),
                          "moved": round(moved(saved, lambda x: x), 3),
                          "moved_after_real_jpeg": round(moved(saved, lambda x: real_jpeg(x, 75)),
                                                         3)}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
