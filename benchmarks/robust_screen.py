"""Screen wrong-target variants for robustness and transfer with the feature probe.

Each variant protects the same 240 Fashion-MNIST training images the lab rows use
(`mmguard lab --limit 240 --on test`), into runs/lab/scr-NAME/protected, then
`feature_probe.probe` reports the feature move on the surrogate's tower under each
attacker transformation and on the other tower family. Rows are appended to
runs/lab/screen-probe.jsonl. Results and their reading: docs/findings-lvlm.md.

    .venv/bin/python benchmarks/robust_screen.py jpeg-eot gray-eot   # or no names: all
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from feature_probe import probe  # noqa: E402

from mmguard.lab import LabSetting, protect_once, split_training  # noqa: E402

EOT_ALL = "jpeg,resize,blur"
VARIANTS = {  # name: (wrong-target options, eps)
    "plain": ({"pgd_steps": 40}, 8 / 255),
    "jpeg-eot": ({"pgd_steps": 40, "robust": "jpeg"}, 8 / 255),
    "coarse2": ({"pgd_steps": 40, "coarse": 2}, 8 / 255),
    "coarse2-jpeg": ({"pgd_steps": 40, "coarse": 2, "robust": "jpeg"}, 8 / 255),
    "gray-eot": ({"pgd_steps": 80, "gray_noise": True, "robust": EOT_ALL}, 8 / 255),
    "ens-div": ({"pgd_steps": 60, "surrogates": ("smolvlm-lite", "smolvlm-lite-b"),
                 "robust": "crop,resize"}, 8 / 255),
    "eps4": ({"pgd_steps": 20}, 4 / 255),  # the "low" strength preset
    "eps16": ({"pgd_steps": 80}, 16 / 255),  # the "high" one
    "dino": ({"pgd_steps": 40, "surrogates": ("smolvlm-lite-c",)}, 8 / 255),  # reverse box
}
TRANSFORMS = ("none", "jpeg:75", "grayscale", "resize:0.5", "blur:1")


def screen(name: str, out: Path) -> None:
    options, eps = VARIANTS[name]
    setting = LabSetting(dataset="fashion-mnist", kind="triples", method="wrong-target",
                         options=options, seeds=(0,), limit=240, evaluate_on="test",
                         limit_test=200, eps=eps)
    train_part, _ = split_training(setting)
    release = Path(f"runs/lab/scr-{name}/protected")
    info = protect_once(train_part, "wrong-target", options, release, eps, print)
    print(f"{name}: protected in {info['seconds']} s, PSNR {info['mean_psnr_db']:.1f}, "
          f"SSIM {info['mean_ssim']:.3f}", flush=True)
    made_on_dino = "smolvlm-lite-c" in options.get("surrogates", ())
    towers = ((("smolvlm-lite-c", ("none", "jpeg:75")), ("smolvlm-lite", ("none",)))
              if made_on_dino else
              (("smolvlm-lite", TRANSFORMS), ("smolvlm-lite-c", ("none", "jpeg:75"))))
    for tower, augments in towers:
        for augment in augments:
            row = {"variant": name, "tower": tower, "augment": augment,
                   **probe(release, "fashion-mnist", tower, augment)}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    for variant in sys.argv[1:] or list(VARIANTS):
        screen(variant, Path("runs/lab/screen-probe.jsonl"))
