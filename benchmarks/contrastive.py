"""Contrastive protection benchmark at CPU scale: the shape of MEM's tables.

    python benchmarks/contrastive.py [--stages main,transfer,partial,adaptive,memory,speed]
                                     [--seeds 0,1,2] [--force]

Protects the emoji training split with each method (as `mmguard protect`
subprocesses, so time and peak memory are per run), trains attackers on the
protected data and tests them on the clean test split. Every finished row is
saved at once in benchmarks/results/contrastive.json and skipped on a rerun,
so a killed benchmark continues where it stopped; docs/benchmarks/contrastive.md
is regenerated from the JSON after every row.

Controls in every comparison: clean training data, uniform random noise in
the same ball, the MEM triggers alone (clean images), the MEM noise alone
(original captions), and the random-guess level of the test set.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import results_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "contrastive.json"
TABLE = ROOT / "docs" / "benchmarks" / "contrastive.md"
WORK = ROOT / "benchmarks" / "work"
MMGUARD = [sys.executable, "-m", "mmguard"]

SURROGATE = ["--surrogate", "rn-tiny", "--batch-size", "64"]
OPTIMISE = ["--rounds", "8", "--train-steps", "5", "--surrogate-lr", "5e-4"]
PROTECTIONS = {
    "random": ["--method", "random"],
    "em": ["--method", "em", *SURROGATE, *OPTIMISE],
    "uap": ["--method", "uap", *SURROGATE, "--clean-epochs", "10", "--surrogate-lr", "5e-4"],
    "mem-3": ["--method", "mem", "--trigger-len", "3", *SURROGATE, *OPTIMISE],
    "mem-5": ["--method", "mem", "--trigger-len", "5", *SURROGATE, *OPTIMISE],
}
ATTACKER = dict(model="rn-tiny", recipe="scratch", epochs=30, lr=5e-4, batch_size=64)


def load_results() -> dict:
    return results_file.load_results(RESULTS)


def save_results(results: dict) -> None:
    results_file.save_results(RESULTS, results, write_table)


def run_measured(command: list[str]) -> dict:
    """Run a command; return wall seconds and the child's peak resident memory."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"seconds": round(time.monotonic() - started, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": stdout.strip()}


def protected_folder(name: str, results: dict, limit: int | None = None) -> Path:
    """Protect emoji:train with a method once; reuse the folder afterwards."""
    from mmguard.data.release import has_run_record, read_run_record

    out = WORK / (name if limit is None else f"{name}-{limit}")
    key = f"protect/{out.name}"
    if key in results["rows"] and has_run_record(out):
        return out
    command = [*MMGUARD, "protect", "--dataset", "emoji", "--split", "train", "--out", str(out),
               "--quiet", *PROTECTIONS[name.split("+")[0]]]
    if limit:
        command += ["--limit", str(limit)]
    if has_run_record(out):
        command.append("--resume")
    measured = run_measured(command)
    record = read_run_record(out)
    pairs = len(record.items)
    results["rows"][key] = {**measured, "pairs": pairs,
                            "pairs_per_second": round(pairs / measured["seconds"], 2),
                            "max_linf_levels": record.max_linf_levels,
                            "mean_psnr_db": record.mean_psnr_db,
                            "optimisation": record.optimisation, "command": command}
    save_results(results)
    return out


def training_sets(folder: Path):
    """(protected, triggers only, noise only) as ImageCaptionSets, in emoji:train order."""
    from mmguard.attack.contrastive import ImageCaptionSet, load_pairs
    from mmguard.data.builtin import load_builtin
    from mmguard.data.sources import read_dataset

    clean = load_pairs(load_builtin("emoji", "train"))
    protected = load_pairs(read_dataset(folder / "manifest.csv"))
    assert len(protected.images) == len(clean.images)
    return (protected, ImageCaptionSet(clean.images, protected.captions),
            ImageCaptionSet(protected.images, clean.captions))


def evaluate_row(results: dict, key: str, train, seeds: list[int], notes=None,
                 **recipe_changes) -> None:
    """Train and test one attacker row unless saved; `notes()` (a dict) is stored with it."""
    if key in results["rows"]:
        return
    from mmguard.attack.contrastive import AttackerRecipe, load_pairs
    from mmguard.data.builtin import load_builtin
    from mmguard.evaluate.protocol import run_seeds

    recipe = replace(AttackerRecipe(**ATTACKER), **recipe_changes)
    test = load_pairs(load_builtin("emoji", "test"))
    result = run_seeds(train() if callable(train) else train, test, recipe, seeds, key,
                       log=lambda line: print(line, flush=True))
    results["rows"][key] = {"attacker": {k: v for k, v in vars(recipe).items() if k != "augment"},
                            "augment": recipe.augment.spec if recipe.augment else None,
                            "seeds": seeds, **(notes() if notes else {}), **result}
    save_results(results)


def clean_train():
    from mmguard.attack.contrastive import load_pairs
    from mmguard.data.builtin import load_builtin

    return load_pairs(load_builtin("emoji", "train"))


def stage_main(results: dict, seeds: list[int]) -> None:
    evaluate_row(results, "main/clean", clean_train, seeds)
    # MEM-3 and its controls first: they are the rows that decide whether it works.
    for name in ("random", "mem-3", "em", "uap", "mem-5"):
        # Protect (or re-protect a deleted work folder) only when a row still needs it.
        sets = {f"main/{name}": 0}
        if name == "mem-3":
            sets.update({"main/mem-3 triggers only": 1, "main/mem-3 noise only": 2})
        for key, index in sets.items():
            evaluate_row(results, key, lambda name=name, index=index: training_sets(
                protected_folder(name, results))[index], seeds)


def stage_transfer(results: dict, seeds: list[int]) -> None:
    protected, triggers, noise = training_sets(protected_folder("mem-3", results))
    evaluate_row(results, "transfer/vit-tiny clean", clean_train, seeds, model="vit-tiny")
    evaluate_row(results, "transfer/vit-tiny mem-3", protected, seeds, model="vit-tiny")
    evaluate_row(results, "transfer/vit-tiny mem-3 triggers only", triggers, seeds,
                 model="vit-tiny")
    # The LiT rows measured before 2026-12-03, with the frozen tower in training mode
    # (BatchNorm statistics re-estimated on the training data; docs/findings.md §11),
    # are kept in the results as "transfer/lit-train-mode-bn ..."; these rerun.
    lit = dict(model="lit", recipe="projection", epochs=10, lr=1e-3)
    evaluate_row(results, "transfer/lit clean", clean_train, seeds[:1], **lit)
    evaluate_row(results, "transfer/lit mem-3", protected, seeds[:1], **lit)
    evaluate_row(results, "transfer/lit mem-3 triggers only", triggers, seeds[:1], **lit)
    # Frozen pretrained towers: is it the MEM noise, or would any noise in the ball do?
    evaluate_row(results, "transfer/lit mem-3 noise only", noise, seeds[:1], **lit)
    evaluate_row(results, "transfer/lit random",
                 lambda: training_sets(protected_folder("random", results))[0], seeds[:1], **lit)


def stage_partial(results: dict, seeds: list[int]) -> None:
    from mmguard.data.builtin import load_builtin
    from mmguard.data.sources import read_dataset
    from mmguard.evaluate.protocol import mix_clean

    folder = protected_folder("mem-3", results)
    protected, _, _ = training_sets(folder)
    for share in (50, 20):
        evaluate_row(results, f"partial/mem-3 {share}% protected",
                     lambda share=share: mix_clean(
                         protected, read_dataset(folder / "manifest.csv"),
                         load_builtin("emoji", "train"), 1 - share / 100, seed=0), seeds[:1])


def stage_adaptive(results: dict, seeds: list[int]) -> None:
    from mmguard.attack.augment import parse_augment

    protected, _, _ = training_sets(protected_folder("mem-3", results))
    for spec in ("jpeg:75", "resize:0.5", "grayscale", "crop-flip", "blur:1"):
        augment = parse_augment(spec)
        evaluate_row(results, f"adaptive/clean {spec}", clean_train, seeds[:1], augment=augment)
        evaluate_row(results, f"adaptive/mem-3 {spec}", protected, seeds[:1], augment=augment)
    # Text side: delete words found in fewer than 2 captions (MEM's triggers are per image).
    from mmguard.attack.text_filter import strip_training_set

    for name, train in (("clean", clean_train()), ("mem-3", protected)):
        stripped, report = strip_training_set(train, 2)
        evaluate_row(results, f"adaptive/{name}, words in < 2 captions stripped", stripped,
                     seeds[:1], notes=lambda report=report: {"strip_rare_words": 2,
                                                             "strip_report": vars(report)})


def stage_memory(results: dict, seeds: list[int]) -> None:
    # One round on 290 and on 1,450 images (5x): peak memory must not follow the data.
    for limit in (290, 1450):
        key = f"memory/mem-3 {limit} images"
        if key in results["rows"]:
            continue
        out = WORK / f"memory-{limit}"
        command = [*MMGUARD, "protect", "--dataset", "emoji", "--split", "train", "--out",
                   str(out), "--quiet", "--limit", str(limit), "--method", "mem",
                   "--trigger-len", "3", *SURROGATE, "--rounds", "1"]
        if out.exists():
            import shutil

            shutil.rmtree(out)
        results["rows"][key] = {**run_measured(command), "pairs": limit}
        save_results(results)


def stage_speed(results: dict, seeds: list[int]) -> None:
    if "speed/mem reference settings" in results["rows"]:
        return
    from benchmarks.speed_reference import measure_phases

    results["rows"]["speed/mem reference settings"] = measure_phases()
    save_results(results)


STAGES = {"main": stage_main, "transfer": stage_transfer, "partial": stage_partial,
          "adaptive": stage_adaptive, "memory": stage_memory, "speed": stage_speed}


def _fmt(row: dict, direction: str, metric: str) -> str:
    mean, std = row["mean"][direction][metric], row["std"][direction][metric]
    return f"{mean:.1f} ± {std:.1f}" if len(row["runs"]) > 1 else f"{mean:.1f}"


def write_table(results: dict) -> None:
    rows = results["rows"]
    lines = ["# Contrastive protection benchmark (CPU scale)", "",
             "Made by `python benchmarks/contrastive.py` (see its docstring); numbers from "
             "`benchmarks/results/contrastive.json`. Data: `emoji` (1,479 train / 391 test "
             "images, one caption each). Attacker trained from scratch unless noted, tested "
             "on the clean test split. R@K in %, MedR 1-based; mean ± std over seeds.", ""]
    # Stage order, whatever order (parallel) stage processes finished their rows in.
    order = ["main/", "transfer/", "partial/", "adaptive/"]
    retrieval = sorted(((k, v) for k, v in rows.items() if "mean" in v), key=lambda kv: next(
        (i for i, prefix in enumerate(order) if kv[0].startswith(prefix)), len(order)))
    if retrieval:
        random_level = retrieval[0][1]["random"]
        lines += ["| training data (attacker) | seeds | i→t R@1 | i→t R@10 | i→t MedR | "
                  "t→i R@1 | t→i R@10 | t→i MedR |", "|---|---|---|---|---|---|---|---|"]
        for key, row in retrieval:
            cells = [_fmt(row, d, m) for d in ("i2t", "t2i") for m in ("R@1", "R@10", "MedR")]
            model = row["attacker"]["model"] + (f", {row['augment']}" if row["augment"] else "")
            lines.append(f"| {key} ({model}) | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        cells = [f"{random_level[d][m]:.1f}"
                 for d in ("i2t", "t2i") for m in ("R@1", "R@10", "MedR")]
        lines.append("| random guess | | " + " | ".join(cells) + " |")
    protect_rows = [(k, v) for k, v in rows.items() if k.startswith(("protect/", "memory/"))]
    if protect_rows:
        lines += ["", "| protection run | pairs | seconds | pairs/s | peak RSS (MB) | max L∞ | "
                  "mean PSNR (dB) |", "|---|---|---|---|---|---|---|"]
        for key, row in protect_rows:
            pairs_per_second = row.get("pairs_per_second",
                                       round(row["pairs"] / row["seconds"], 2))
            linf = row.get("max_linf_levels")
            lines.append(f"| {key} | {row['pairs']} | {row['seconds']} | {pairs_per_second} | "
                         f"{row['peak_rss_mb']} | {'' if linf is None else f'{linf}/255'} | "
                         f"{row.get('mean_psnr_db') or ''} |")
    speed = rows.get("speed/mem reference settings")
    if speed:
        lines += ["", "MEM per-batch phases at the reference code's settings "
                  f"({speed['settings']}), measured alone; `uptime` right after: "
                  f"{speed['uptime']}. Speed-up of trigger + PGD: "
                  f"{speed['speedup_trigger_plus_pgd']}x.", "",
                  "| phase, per batch | mmguard (s) | reference (s, calibration.md) |",
                  "|---|---|---|"]
        for phase, seconds in speed["phases"].items():
            lines.append(f"| {phase} | {seconds} | {speed['reference'].get(phase, '')} |")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--force", action="store_true", help="forget saved rows and redo all")
    args = parser.parse_args()
    results = results_file.forget_results(RESULTS) if args.force else load_results()
    seeds = [int(s) for s in args.seeds.split(",")]
    for stage in args.stages.split(","):
        print(f"== stage {stage}", flush=True)
        STAGES[stage](results, seeds)
    save_results(results)
    print(TABLE.read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
