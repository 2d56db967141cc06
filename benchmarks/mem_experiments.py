"""The single-seed experiments behind docs/findings.md (MEM efficacy at CPU scale).

    python benchmarks/mem_experiments.py protect OUT '{"trigger_len": 3, ...}' [--limit N]
    python benchmarks/mem_experiments.py controls OUT [--limit N]
    python benchmarks/mem_experiments.py probe OUT

`protect` protects the first N (default all) emoji training pairs with MEM
and the given MEM options; `controls` trains an rn-tiny attacker from
scratch (30 epochs, seed 0) on the protected pairs, on the triggers only
(clean images), on the noise only (original captions) and on the clean pairs,
and tests each on the clean emoji test split; `probe` trains attackers on the
protected and on the clean pairs and measures retrieval on 391 of their own
training items with the text reduced to the trigger words, to see which
channel they learned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from mmguard.attack.contrastive import AttackerRecipe, ImageCaptionSet, load_pairs, train_attacker
from mmguard.data.builtin import load_builtin
from mmguard.data.release import read_run_record
from mmguard.data.sources import read_dataset
from mmguard.evaluate.retrieval import evaluate_retrieval
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset

BASE = {"surrogates": ["rn-tiny"], "batch_size": 64, "rounds": 8, "train_steps": 5,
        "surrogate_lr": 5e-4, "trigger_len": 3}
RECIPE = AttackerRecipe(model="rn-tiny", epochs=30, seed=0)


def _line(name: str, metrics: dict) -> str:
    i2t, t2i = metrics["i2t"], metrics["t2i"]
    return (f"{name}: i2t R@1 {i2t['R@1']:.1f} R@10 {i2t['R@10']:.1f} MedR {i2t['MedR']:.0f}"
            f" | t2i R@10 {t2i['R@10']:.1f} MedR {t2i['MedR']:.0f}")


def _sets(out: Path, limit: int | None):
    clean = load_pairs(load_builtin("emoji", "train"))
    protected = load_pairs(read_dataset(out / "manifest.csv"))
    n = len(protected.images)
    assert limit is None or n == limit
    clean = ImageCaptionSet(clean.images[:n], clean.captions[:n])
    return clean, protected


def protect(out: Path, settings: dict, limit: int | None) -> None:
    settings = {**BASE, **settings}
    settings["surrogates"] = tuple(settings["surrogates"])
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    method = create_method("mem", "pairs", **settings)
    protect_dataset(load_builtin("emoji", "train"), method, out, limit=limit, progress=False)
    optimisation = read_run_record(out).optimisation
    print(f"protect {time.monotonic() - started:.0f} s", json.dumps(optimisation))


def controls(out: Path, limit: int | None) -> None:
    clean, protected = _sets(out, limit)
    test = load_pairs(load_builtin("emoji", "test"))
    for name, train in (("protected", protected),
                        ("triggers only", ImageCaptionSet(clean.images, protected.captions)),
                        ("noise only", ImageCaptionSet(protected.images, clean.captions)),
                        ("clean", clean)):
        model, _ = train_attacker(train, RECIPE)
        print(_line(name, evaluate_retrieval(model, test)), flush=True)


def probe(out: Path) -> None:
    clean, protected = _sets(out, None)
    triggers = [[caption[0][: -len(original[0]) - 1]]
                for caption, original in zip(protected.captions, clean.captions, strict=True)]
    part = slice(0, 391)

    def view(images, captions):
        return ImageCaptionSet(images[part], captions[part])

    for name, train in (("protected", protected), ("clean", clean)):
        model, _ = train_attacker(train, RECIPE)
        print(f"{name} attacker, probed on its training items:")
        for label, probe_set in (
                ("protected images + trigger words", view(protected.images, triggers)),
                ("clean images + trigger words", view(clean.images, triggers)),
                ("clean images + clean captions", view(clean.images, clean.captions))):
            print("  " + _line(label, evaluate_retrieval(model, probe_set)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("protect", "controls", "probe"))
    parser.add_argument("out", type=Path)
    parser.add_argument("settings", nargs="?", default="{}")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "protect":
        protect(args.out, json.loads(args.settings), args.limit)
    elif args.command == "controls":
        controls(args.out, args.limit)
    else:
        probe(args.out)


if __name__ == "__main__":
    main()
