"""MMGuard as the paper defines it, row by row, against every control (the fidelity benchmark).

    .venv/bin/python benchmarks/fidelity_lvlm.py [ROW ...] [--seeds 0,1,2] [--list]

Each row is one `mmguard lab` setting on the white-box Fashion-MNIST VQA slice the
wrong-target benchmark uses (first 240 training images protected, the first 200
clean test images scored, attacker smolvlm-lite LoRA + projector, 8 epochs at lr
1e-3, scored after the last epoch), so the clean and uniform attacker runs of all
rows are shared (benchmarks/results/lab-controls.json). Every row reports the
method, its noise alone (original prompts) and its trigger alone (clean images).

The rows answer the paper's qualitative claims (issue: fidelity):
- paper: BPH (Eq 27) on the first 2 attention layers, -Max objective (Eq 32), one
  inner LoRA step per round (Q = 1), 5-token triggers;
- binding: paper with CRS (Eq 29) in place of BPH, and with no binding loss;
- objective: paper with min in place of -Max;
- inner: paper with Q = 0;
- layers: paper with the binding loss on all 30 layers (|K| = all);
- modality: paper optimised image only and text only.
Optimisation effort is the earlier benchmark's (2 rounds of HotFlip top-4 then 6
PGD steps of 1/255, batch 8) for every row; the binding weight is 0.5, one of the
paper's swept values (the sweep itself is not run here).

A finished row is written to benchmarks/results/lab-fidelity.json (+ .md) and
skipped on a rerun; a killed row resumes from its last finished attacker run
(its work folder is benchmarks/work/fidelity-ROW). Rows run in the order below.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmguard.lab import ControlCache, LabSetting, append_row, run_lab

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lab-fidelity.json"
CONTROLS = ROOT / "benchmarks" / "results" / "lab-controls.json"
WORK = ROOT / "benchmarks" / "work"
ATTACKER = "smolvlm-lite:lora:epochs=8,lr=1e-3,batch_size=8"
EFFORT = {"rounds": 2, "pgd_steps": 6, "top_k": 4, "batch_size": 8}
PAPER = {**EFFORT, "binding": "bph-exact", "binding_layers": 2, "objective": "max",
         "inner_steps": 1, "trigger_len": 5, "binding_weight": 0.5}
ROWS = {
    "paper": PAPER,
    "paper-min": {**PAPER, "objective": "min"},
    "no-binding": {**PAPER, "binding": "none"},
    "crs": {**PAPER, "binding": "crs-kl"},
    "q0": {**PAPER, "inner_steps": 0},
    "all-layers": {**PAPER, "binding_layers": 30},
    "image-only": {**PAPER, "components": "image"},
    "text-only": {**PAPER, "components": "text"},
}


def setting(options: dict, seeds: tuple[int, ...]) -> LabSetting:
    return LabSetting(dataset="fashion-mnist", kind="triples", method="mmguard",
                      options=options, attackers=(ATTACKER,), seeds=seeds, limit=240,
                      evaluate_on="test", limit_test=200)


def run(names: list[str], seeds: tuple[int, ...]) -> None:
    import json

    done = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else {}
    for name in names:
        label = f"fidelity/{name} seeds {','.join(map(str, seeds))}"
        if label in done:
            print(f"{label}: done", flush=True)
            continue
        row = run_lab(setting(ROWS[name], seeds), WORK / f"fidelity-{name}",
                      log=lambda line: print(line, flush=True), every_epoch=False,
                      cache=ControlCache(CONTROLS))
        row["options"] = ROWS[name]
        append_row(RESULTS, RESULTS.with_suffix(".md"), label, row)
        print(f"{label}: written to {RESULTS.name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="*", help=f"rows to run [all]: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args()
    if args.list:
        for name, options in ROWS.items():
            print(f"{name:12s} {options}")
        return
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(ROWS)}")
    run(args.rows or list(ROWS), tuple(int(s) for s in args.seeds.split(",")))


if __name__ == "__main__":
    main()
