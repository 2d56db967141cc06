"""LVLM protection benchmark at CPU scale: MMGuard against fine-tuned embedded LVLMs.

    python benchmarks/lvlm.py [--stages main,binding,ablation,blackbox,extension,adaptive]
                              [--seeds 0]
                              [--train 160] [--test 200] [--force]

Data: the VQA form of Fashion-MNIST ("What kind of clothing is this?" -> one
of ten class names), first --train training and --test test images. The
embedded LVLMs were aligned on emoji and digits captions only, so zero-shot
they barely know the classes and fine-tuning is what teaches them.

Each protection runs once as an `mmguard protect` subprocess (time and peak
memory measured) into benchmarks/work/lvlm-*; attackers are fine-tuned (LoRA
+ projector) on each training set and answer the clean test prompts. Every
finished row is saved at once in benchmarks/results/lvlm.json and skipped on a
rerun, so a killed benchmark continues; docs/benchmarks/lvlm.md is rewritten
after every row.

Controls: clean training data, uniform random noise in the same ball, the
MMGuard triggers alone (clean images), the MMGuard noise alone (original
prompts), and the zero-shot, random-guess and majority levels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import results_file  # noqa: E402
from benchmarks.contrastive import run_measured  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lvlm.json"
TABLE = ROOT / "docs" / "benchmarks" / "lvlm.md"
WORK = ROOT / "benchmarks" / "work"
MMGUARD = [sys.executable, "-m", "mmguard"]
DATA = "fashion-mnist"

# The settings this benchmark was measured with: mmguard's defaults before they became the
# paper's (5-token triggers, binding weight 2.0, -Max, one inner LoRA step).
OPTIMISE = ["--rounds", "2", "--pgd-steps", "6", "--top-k", "4", "--batch-size", "8",
            "--trigger-len", "3", "--binding-weight", "0.5", "--objective", "min",
            "--inner-steps", "0"]
PROTECTIONS = {
    "random": ["--method", "random"],
    "bph": ["--method", "mmguard", "--binding", "bph", *OPTIMISE],
    "crs": ["--method", "mmguard", "--binding", "crs", *OPTIMISE],
    "none": ["--method", "mmguard", "--binding", "none", *OPTIMISE],
    "image-only": ["--method", "mmguard", "--binding", "bph", "--components", "image",
                   *OPTIMISE],
    "text-only": ["--method", "mmguard", "--binding", "bph", "--components", "text",
                  *OPTIMISE],
    "bph-b": ["--method", "mmguard", "--binding", "bph", "--surrogate", "smolvlm-lite-b",
              *OPTIMISE],
    "bph-response-groups": ["--method", "mmguard", "--binding", "bph", "--trigger-groups",
                            "response", *OPTIMISE],
    "image-only-response-groups": ["--method", "mmguard", "--binding", "bph", "--components",
                                   "image", "--noise-groups", "response", *OPTIMISE],
    # The surrogate's projector learns the shared noise between updates, at the attacker's lr.
    "image-only-response-groups-bilevel": [
        "--method", "mmguard", "--binding", "bph", "--components", "image", "--noise-groups",
        "response", "--bilevel", "--train-steps", "2", "--surrogate-lr", "1e-3", *OPTIMISE],
}
ATTACKER = dict(model="smolvlm-lite", recipe="lora", epochs=8, lr=1e-3, batch_size=8)


def load_results() -> dict:
    return results_file.load_results(RESULTS)


def save_results(results: dict) -> None:
    results_file.save_results(RESULTS, results, write_table)


class Bench:
    def __init__(self, results: dict, seeds: list[int], train: int, test: int):
        self.results, self.seeds, self.train_size, self.test_size = results, seeds, train, test
        self._test = None
        self._clean = None

    @property
    def rows(self) -> dict:
        return self.results["rows"]

    def test_set(self):
        if self._test is None:
            from mmguard.attack.triples import load_triples
            from mmguard.data.builtin import load_builtin

            self._test = load_triples(load_builtin(DATA, "test", "triples"), self.test_size)
        return self._test

    def clean_set(self):
        if self._clean is None:
            from mmguard.attack.triples import load_triples
            from mmguard.data.builtin import load_builtin

            self._clean = load_triples(load_builtin(DATA, "train", "triples"), self.train_size)
        return self._clean

    def protected(self, name: str) -> Path:
        """Protect the training slice with one setting once; reuse the folder afterwards."""
        out = WORK / f"lvlm-{name}-{self.train_size}"
        WORK.mkdir(parents=True, exist_ok=True)
        # Another benchmark process may be making the same folder: wait for it, then reuse.
        with results_file.locked(out):
            for key, row in load_results()["rows"].items():
                self.rows.setdefault(key, row)
            return self._protect(name, out)

    def _protect(self, name: str, out: Path) -> Path:
        from mmguard.data.release import has_run_record, read_run_record

        key = f"protect/{name}"
        if key in self.rows and has_run_record(out):
            return out
        command = [*MMGUARD, "protect", "--dataset", DATA, "--split", "train", "--kind",
                   "triples", "--limit", str(self.train_size), "--out", str(out), "--quiet",
                   *PROTECTIONS[name]]
        if out.exists():
            command.append("--resume")  # a killed benchmark keeps its finished rounds
        print(f"protect {name}: {' '.join(command[2:])}", flush=True)
        measured = run_measured(command)
        record = read_run_record(out)
        items = record.items
        triggers = [item.trigger for item in items if item.trigger]
        psnrs = [item.psnr_db for item in items if item.psnr_db != float("inf")]
        self.rows[key] = {
            **{k: v for k, v in measured.items() if k != "stdout"}, "images": len(items),
            "images_per_second": round(len(items) / measured["seconds"], 3),
            "max_linf_levels": record.max_linf_levels,
            "mean_psnr_db": round(sum(psnrs) / len(psnrs), 2) if psnrs else None,
            "trigger_words": (round(sum(len(t.split()) for t in triggers) / len(triggers), 2)
                              if triggers else 0),
            "example_triggers": triggers[:5],
            "optimisation": record.optimisation}
        save_results(self.results)
        return out

    def training_sets(self, name: str):
        """(protected, triggers only, noise only) TripleSets for a protection."""
        from mmguard.attack.triples import TripleSet, load_triples
        from mmguard.data.sources import read_dataset

        protected = load_triples(read_dataset(self.protected(name) / "manifest.csv"))
        clean = self.clean_set()
        assert protected.keys == [k.split("/")[-1] for k in clean.keys] or \
            len(protected.images) == len(clean.images)
        return (protected, TripleSet(clean.images, protected.turns, clean.keys),
                TripleSet(protected.images, clean.turns, clean.keys))

    def row(self, key: str, train, notes: dict | None = None, **recipe_changes) -> None:
        """Fine-tune and score one attacker row unless saved; `notes` are stored with it."""
        if key in self.rows:
            return
        from dataclasses import replace

        from mmguard.attack.lvlm import LVLMRecipe
        from mmguard.evaluate.lvlm_protocol import AnswerEvaluation, run_lvlm_seeds

        recipe = replace(LVLMRecipe(**ATTACKER), **recipe_changes)
        settings = AnswerEvaluation(max_new_tokens=6)
        result = run_lvlm_seeds(train() if callable(train) else train, self.test_set(), recipe,
                                self.seeds, key, settings, log=lambda s: print(s, flush=True))
        for run in result["runs"]:
            run.pop("step_losses", None)
        self.rows[key] = {"attacker": recipe.model, "recipe": recipe.recipe,
                          "seeds": self.seeds, **(notes or {}), **result}
        save_results(self.results)

    def zero_shot(self, model: str) -> None:
        key = f"zero-shot/{model}"
        if key in self.rows:
            return
        from mmguard.evaluate.lvlm_protocol import AnswerEvaluation, evaluate_answers
        from mmguard.evaluate.vqa import reference_levels
        from mmguard.models.lvlm.registry import create_lvlm

        adapter = create_lvlm(model)
        metrics = evaluate_answers(adapter, self.test_set(), self.clean_set(),
                                   AnswerEvaluation(max_new_tokens=6))
        _, examples = self.test_set().inputs()
        self.rows[key] = {"attacker": model, **metrics,
                          "reference": reference_levels([e.response for e in examples])}
        save_results(self.results)


def stage_main(bench: Bench) -> None:
    bench.zero_shot("smolvlm-lite")
    bench.row("main/clean", bench.clean_set)
    bench.row("main/random noise", lambda: bench.training_sets("random")[0])
    protected, triggers, noise = bench.training_sets("bph")
    bench.row("main/mmguard-bph", protected)
    bench.row("main/mmguard-bph triggers only", triggers)
    bench.row("main/mmguard-bph noise only", noise)


def stage_binding(bench: Bench) -> None:
    for name in ("crs", "none"):
        bench.row(f"binding/mmguard-{name}", lambda name=name: bench.training_sets(name)[0])


def stage_ablation(bench: Bench) -> None:
    for name in ("image-only", "text-only"):
        bench.row(f"ablation/mmguard {name}", lambda name=name: bench.training_sets(name)[0])


def stage_blackbox(bench: Bench) -> None:
    other = dict(model="smolvlm-lite-b")
    bench.zero_shot("smolvlm-lite-b")
    bench.row("blackbox/clean (attacker smolvlm-lite-b)", bench.clean_set, **other)
    bench.row("blackbox/mmguard-bph from smolvlm-lite-b (attacker smolvlm-lite)",
              lambda: bench.training_sets("bph-b")[0])
    bench.row("blackbox/mmguard-bph from smolvlm-lite (attacker smolvlm-lite-b)",
              lambda: bench.training_sets("bph")[0], **other)


def stage_extension(bench: Bench) -> None:
    """Beyond the paper: one trigger, or one noise pattern, shared by all items with the
    same answer."""
    protected, triggers, _ = bench.training_sets("bph-response-groups")
    bench.row("extension/mmguard-bph, triggers shared per answer", protected)
    bench.row("extension/mmguard-bph, triggers shared per answer, triggers only", triggers)
    bench.row("extension/mmguard-bph, triggers shared per answer (attacker smolvlm-lite-b)",
              protected, model="smolvlm-lite-b")
    # Image side only (no text for a stripping attacker to remove): noise shared per answer.
    def noise():
        return bench.training_sets("image-only-response-groups")[0]

    bench.row("extension/mmguard image-only, noise shared per answer", noise)
    bench.row("extension/mmguard image-only, noise shared per answer (attacker smolvlm-lite-b)",
              noise, model="smolvlm-lite-b")
    bench.row("extension/mmguard image-only, noise shared per answer, bilevel",
              lambda: bench.training_sets("image-only-response-groups-bilevel")[0])


def stage_adaptive(bench: Bench) -> None:
    """An attacker who deletes rare words from the prompts before fine-tuning.

    Below 2 texts catches per-item triggers; below half of the prompts also
    catches triggers shared per answer (every clean prompt is the same question,
    so the clean training set is unchanged by either and needs no new row).
    """
    from mmguard.attack.text_filter import strip_training_set

    for name, label in (("bph", "mmguard-bph"),
                        ("bph-response-groups", "mmguard-bph, triggers shared per answer")):
        for min_texts, rule in ((2, "in < 2 prompts"), (0.5, "in < 50% of prompts")):
            stripped, report = strip_training_set(bench.training_sets(name)[0], min_texts)
            bench.row(f"adaptive/{label}, words {rule} stripped", stripped,
                      notes={"strip_rare_words": min_texts, "strip_report": vars(report)})


STAGES = {"main": stage_main, "binding": stage_binding, "ablation": stage_ablation,
          "blackbox": stage_blackbox, "extension": stage_extension, "adaptive": stage_adaptive}


def _cell(row: dict, metric: str, digits: int = 1) -> str:
    mean, std = row["mean"][metric], row["std"][metric]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["runs"]) > 1 else \
        f"{mean:.{digits}f}"


def write_table(results: dict) -> None:
    rows = results["rows"]
    lines = ["# LVLM protection benchmark (CPU scale)", "",
             "Made by `python benchmarks/lvlm.py` (see its docstring); numbers from "
             "`benchmarks/results/lvlm.json`. Data: Fashion-MNIST as VQA (\"What kind of "
             "clothing is this?\" -> class name), "
             f"{results.get('sizes', {}).get('train', '?')} training and "
             f"{results.get('sizes', {}).get('test', '?')} test images. Attacker: LoRA "
             "(+ projector) fine-tuning, 8 epochs at lr 1e-3; exact match after normalisation "
             "on the clean test prompts. Degradation = 1 - row / clean row of the same "
             "attacker.", ""]
    lines += ["| training data | attacker | exact match % | contains % | degradation | "
              "attention TV train↔test | final train loss |", "|---|---|---|---|---|---|---|"]
    clean = {row["attacker"]: row["mean"]["exact_match"] for key, row in rows.items()
             if key.endswith("clean") or key.startswith("blackbox/clean")
             if "mean" in row}
    # Stage order, whatever order parallel stage processes finished their rows in.
    order = ["zero-shot/", "main/", "binding/", "ablation/", "blackbox/", "extension/",
             "adaptive/"]
    ranked = sorted(rows.items(), key=lambda kv: next(
        (i for i, prefix in enumerate(order) if kv[0].startswith(prefix)), len(order)))
    for key, row in ranked:
        if key.startswith("zero-shot/"):
            lines.append(f"| untouched (zero-shot) | {row['attacker']} | "
                         f"{row['exact_match']:.1f} | {row['contains_match']:.1f} | | "
                         f"{row['tv_distance']:.3f} | |")
            continue
        if "mean" not in row:
            continue
        base = clean.get(row["attacker"])
        exact = row["mean"]["exact_match"]
        degradation = "" if not base or "clean" in key else f"{100 * (1 - exact / base):.0f}%"
        lines.append(f"| {key} | {row['attacker']} | {_cell(row, 'exact_match')} | "
                     f"{_cell(row, 'contains_match')} | {degradation} | "
                     f"{_cell(row, 'tv_distance', 3)} | {_cell(row, 'final_train_loss', 3)} |")
    reference = next((row["reference"] for row in rows.values() if "reference" in row), None)
    if reference:
        lines.append(f"| random guess (1 of {reference['distinct_answers']}) | | "
                     f"{reference['random']:.1f} | | | | |")
        lines.append(f"| majority answer | | {reference['majority']:.1f} | | | | |")
    protect_rows = [(k, v) for k, v in rows.items() if k.startswith("protect/")]
    if protect_rows:
        lines += ["", "| protection run | images | seconds | images/s | peak RSS (MB) | max L∞ | "
                  "mean PSNR (dB) | trigger words | example triggers |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, row in protect_rows:
            examples = "; ".join(row["example_triggers"][:3])
            lines.append(f"| {key} | {row['images']} | {row['seconds']} | "
                         f"{row['images_per_second']} | {row['peak_rss_mb']} | "
                         f"{row['max_linf_levels']}/255 | {row['mean_psnr_db']} | "
                         f"{row['trigger_words']} | {examples} |")
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--force", action="store_true", help="forget saved rows and redo all")
    args = parser.parse_args()
    results = results_file.forget_results(RESULTS) if args.force else load_results()
    sizes = {"train": args.train, "test": args.test}
    if results.get("sizes") not in (None, sizes):
        raise SystemExit(f"{RESULTS} holds rows for sizes {results['sizes']}; pass the same "
                         "--train/--test or --force")
    results["sizes"] = sizes
    bench = Bench(results, [int(s) for s in args.seeds.split(",")], args.train, args.test)
    for stage in args.stages.split(","):
        print(f"== stage {stage}", flush=True)
        STAGES[stage](bench)
    save_results(results)
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
