"""The papers' methods as published, row by row, against every control (fidelity benchmark).

    .venv/bin/python benchmarks/fidelity.py [ROW ...] [--seeds 0,1,2] [--list]

Each row is one `mmguard lab` setting scored on the test split, reporting the
method, its noise alone (original texts) and its trigger alone (clean images)
beside the clean and uniform-noise controls, whose attacker runs all rows of a
slice share (benchmarks/results/lab-controls.json).

MMGuard rows (LVLM): the white-box Fashion-MNIST VQA slice of the wrong-target
benchmark (first 240 training images protected, first 200 clean test images,
attacker smolvlm-lite LoRA + projector, 8 epochs at lr 1e-3, scored after the
last epoch). They answer the paper's qualitative claims:
- paper: BPH (Eq 27) on the first 2 attention layers, -Max objective (Eq 32), one
  inner LoRA step per round (Q = 1), 5-token triggers;
- no-binding / crs: paper without a binding loss, or with CRS (Eq 29);
- paper-min: min in place of -Max; q0: Q = 0; all-layers: |K| = all 30 layers;
- image-only / text-only: paper optimised on one modality;
- black-box: paper on the paper's black-box ensemble of two surrogates that
  excludes the attacker (smolvlm-lite and smolvlm-lite-b, both on
  EfficientNet-Lite0), attacked by smolvlm-lite-c (a DINOv2 tower);
- emoji-paper: the paper row on the second, harder set (emoji-categories: 73
  answers, every test emoji unseen in training), first 480 training images, the
  slice whose controls the wrong-target benchmark cached.
Only the paper, black-box and emoji-paper rows train on their noise alone and their
trigger alone; the ablations leave those two controls out (`split_controls`, two LoRA runs per
seed that do not rank the variants). A variant that beats the paper row gets
them by turning the flag on: its release and method runs are resumed.
Effort is the earlier benchmark's for every row (2 rounds of HotFlip top-4 then
6 PGD steps of 1/255, batch 8). The binding weight is 2.0, the best value of
the paper's own sweep over {0.1, 0.2, 0.5, 1, 2} for both BPH and CRS (its
appendix: BPH about 65 / 65 / 66 / 68 / 63, CRS improving to 54 at 2.0, lower
is stronger); it is not swept again here: one protection of the 240 images
takes about 28 min on 2 cores (3.5 s per image and round) and each setting
needs LoRA runs to score.

MEM rows (pairs): the multi-caption emoji set (emoji-captions, 2-4 captions per
image from real sources), first 600 training images, attacker rn-tiny CLIP from
scratch (30 epochs), the whole clean test split:
- mem-image: one noise and trigger per image, shared by its captions (MEM-3, the
  demo's settings);
- mem-caption: the same, one noise and trigger per caption row (the reference
  code's release);
- mem-reference: per caption row in the reference code's regime (200 surrogate
  steps per round at lr 1e-4, captions re-shuffled every PGD step, random first
  triggers, triggers updated in the first quarter of the rounds).

A finished row is written to benchmarks/results/lab-fidelity.json (+ .md) and
skipped on a rerun unless its setting changed (then its release and runs are reused
where they still apply); a killed row resumes from its last finished attacker run
(its work folder is benchmarks/work/fidelity-ROW). Rows run in the order below.

An LVLM row takes about 2 h on 2 cores (the protection alone 30-80 min, by the
machine), longer than is left on a machine that may not be kept. So what a row
has finished is also kept in benchmarks/carry/fidelity-ROW, which is committed:
the finished release (its images, manifest and run record; not its work state)
and the attacker runs trained on it. A row whose work folder is gone starts from
there: the release is not made again, and only the missing attacker runs train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from mmguard.data.release import RUN_RECORD, read_run_record
from mmguard.lab import ControlCache, LabSetting, append_row, run_lab

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lab-fidelity.json"
CONTROLS = ROOT / "benchmarks" / "results" / "lab-controls.json"
WORK = ROOT / "benchmarks" / "work"
CARRY = ROOT / "benchmarks" / "carry"
RUNS = "attacker-runs.json"  # the lab's record of the attacker runs on a row's release
RELEASE_FIELDS = ("dataset", "kind", "method", "options", "limit", "holdout", "evaluate_on",
                  "eps")
LVLM_ATTACKER = "smolvlm-lite:lora:epochs=8,lr=1e-3,batch_size=8"
EFFORT = {"rounds": 2, "pgd_steps": 6, "top_k": 4, "batch_size": 8}
PAPER = {**EFFORT, "binding": "bph-exact", "binding_layers": 2, "objective": "max",
         "inner_steps": 1, "trigger_len": 5, "binding_weight": 2.0}
MEM3 = {"trigger_len": 3, "surrogates": ("rn-tiny",), "batch_size": 64, "rounds": 8,
        "train_steps": 5, "surrogate_lr": 5e-4}
MEM_REFERENCE = {**MEM3, "noise_per": "caption", "round_train_steps": 200, "train_steps": 0,
                 "surrogate_lr": 1e-4, "shuffle_every": "step", "trigger_init": "random",
                 "trigger_rounds": 2}


def lvlm_row(options: dict, split_controls: bool = False, attacker: str = LVLM_ATTACKER,
             dataset: str = "fashion-mnist", limit: int = 240) -> LabSetting:
    return LabSetting(dataset=dataset, kind="triples", method="mmguard",
                      options=options, attackers=(attacker,), limit=limit,
                      evaluate_on="test", limit_test=200, split_controls=split_controls)


def mem_row(options: dict) -> LabSetting:
    return LabSetting(dataset="emoji-captions", kind="pairs", method="mem", options=options,
                      attackers=("rn-tiny:scratch",), limit=600, evaluate_on="test")


ROWS = {
    "paper": lvlm_row(PAPER, split_controls=True),
    "paper-min": lvlm_row({**PAPER, "objective": "min"}),
    "no-binding": lvlm_row({**PAPER, "binding": "none"}),
    "crs": lvlm_row({**PAPER, "binding": "crs-kl"}),
    "q0": lvlm_row({**PAPER, "inner_steps": 0}),
    "all-layers": lvlm_row({**PAPER, "binding_layers": 30}),
    "image-only": lvlm_row({**PAPER, "components": "image"}),
    "text-only": lvlm_row({**PAPER, "components": "text"}),
    "black-box": lvlm_row({**PAPER, "surrogates": ("smolvlm-lite", "smolvlm-lite-b")},
                          split_controls=True,  # its seed 0 beat the prediction: which part did it?
                          attacker=LVLM_ATTACKER.replace("smolvlm-lite:", "smolvlm-lite-c:")),
    "emoji-paper": lvlm_row(PAPER, dataset="emoji-categories", limit=480,
                            split_controls=True),  # the strongest MMGuard row: which part?
    "mem-image": mem_row(MEM3),
    "mem-caption": mem_row({**MEM3, "noise_per": "caption"}),
    "mem-reference": mem_row(MEM_REFERENCE),
}


def _merge_runs(source: Path, target: Path) -> None:
    """Add the attacker runs recorded in `source` to those in `target`."""
    if not source.exists():
        return
    runs = json.loads(target.read_text()) if target.exists() else {}
    added = json.loads(source.read_text())
    if added.keys() - runs.keys():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({**added, **runs}, indent=1) + "\n")


def _finished(release: Path) -> bool:
    return (release / RUN_RECORD).exists() and read_run_record(release).status == "complete"


def _release_setting(setting: LabSetting) -> str:
    """What the release depends on (the training part and the method), not the attackers."""
    fields = dataclasses.asdict(setting)
    return json.dumps({name: fields[name] for name in RELEASE_FIELDS}, sort_keys=True,
                      default=list)


def _unchanged(written: dict, setting: LabSetting) -> bool:
    """Whether a finished row was run with `setting` (a field the row predates had its
    default; the results file holds tuples as lists)."""
    defaults = {field.name: field.default for field in dataclasses.fields(LabSetting)
                if field.default is not dataclasses.MISSING}
    as_json = json.loads(json.dumps(dataclasses.asdict(setting)))
    return json.loads(json.dumps({**defaults, **written})) == as_json


def restore(work: Path, kept: Path, setting: LabSetting) -> bool:
    """Start a row whose work folder is gone from what was kept of it; False when what
    was kept was made for another setting of the row (then it is not used)."""
    made_for = kept / "setting.json"
    if not made_for.exists():
        return False
    if made_for.read_text() != _release_setting(setting):
        print(f"{kept}: kept for another setting of this row, not used", flush=True)
        return False
    if _finished(kept / "protected") and not (work / "protected").exists():
        shutil.copytree(kept / "protected", work / "protected")
    _merge_runs(kept / RUNS, work / RUNS)
    return True


def keep(work: Path, kept: Path, setting: LabSetting) -> None:
    """Keep the finished release and the attacker runs so far (cheap when nothing changed)."""
    if not _finished(work / "protected"):
        return
    if not (kept / "protected").exists():
        shutil.rmtree(kept, ignore_errors=True)  # what was kept for another setting
        shutil.copytree(work / "protected", kept / "protected",
                        ignore=shutil.ignore_patterns(".mmguard"))
        (kept / "setting.json").write_text(_release_setting(setting))
    _merge_runs(work / RUNS, kept / RUNS)


def run(names: list[str], seeds: tuple[int, ...]) -> None:
    done = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else {}
    for name in names:
        label = f"fidelity/{name} seeds {','.join(map(str, seeds))}"
        setting = dataclasses.replace(ROWS[name], seeds=seeds)
        if label in done and _unchanged(done[label]["setting"], setting):
            print(f"{label}: done", flush=True)
            continue
        work, kept = WORK / f"fidelity-{name}", CARRY / f"fidelity-{name}"
        if not restore(work, kept, setting) and (kept / "protected").exists():
            shutil.rmtree(kept / "protected")  # made for another setting: replaced when done

        def log(line: str, work: Path = work, kept: Path = kept,
                setting: LabSetting = setting) -> None:
            print(line, flush=True)
            keep(work, kept, setting)  # the lab logs when the release is done and after each run

        row = run_lab(setting, work, log=log,
                      every_epoch=setting.kind == "pairs",  # LVLM runs: last epoch only (cost)
                      cache=ControlCache(CONTROLS))
        append_row(RESULTS, RESULTS.with_suffix(".md"), label, row)
        print(f"{label}: written to {RESULTS.name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="*", help=f"rows to run [all]: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args()
    if args.list:
        for name, setting in ROWS.items():
            print(f"{name:14s} {setting.dataset} {setting.method} {setting.options}")
        return
    unknown = [name for name in args.rows if name not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(ROWS)}")
    run(args.rows or list(ROWS), tuple(int(s) for s in args.seeds.split(",")))


if __name__ == "__main__":
    main()
