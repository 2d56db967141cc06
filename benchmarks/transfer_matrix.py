"""Which attackers a release reaches: the `mmguard lab` rows as a release x attacker matrix.

Every lab row records its release (method, options, budget, slice), the surrogates it
was made on, and each attacker's scores on clean data, on uniform noise in the same
ball and on the release, over its seeds. Read across rows, that is a transfer matrix:
one line per release, one column per attacker model, white box where the attacker's
model is one the release was made on. Typing it by hand drifts from the rows; this
builds it from them.

Only rows without an attacker transformation or rare-word stripping count (those are
robustness rows, not transfer), on one dataset and evaluation split. Rows that measure
the same release against the same attacker on different seeds (a row per seed) join
into one cell; a seed measured twice keeps the row read last (files in the order given,
rows in file order). Options are as each row recorded them: a release made before a
default changed and one that gave the new default explicitly are separate lines.

    .venv/bin/python benchmarks/transfer_matrix.py --dataset fashion-mnist \\
        benchmarks/results/lab-blackbox.json benchmarks/results/lab-bench.json

Writes benchmarks/results/transfer-<dataset>.md (and prints it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.results_file import load_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FILES = ("lab-blackbox.json", "lab-bench.json", "lab-fidelity.json")
# A lab row's three arms per attacker (the release is "method"), in a cell's tuple order.
ARMS = ("method", "clean", "uniform")
RELEASE, CLEAN, UNIFORM = range(len(ARMS))


@dataclass
class Cell:
    """One release against one attacker: per attacker seed, (release, clean, uniform)."""

    by_seed: dict[int, tuple[float, float, float]]
    white_box: bool

    @property
    def seeds(self) -> int:
        return len(self.by_seed)

    def mean(self, arm: int) -> float:
        return statistics.fmean(scores[arm] for scores in self.by_seed.values())

    def sem(self, arm: int) -> float:
        values = [scores[arm] for scores in self.by_seed.values()]
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0

    def text(self) -> str:
        protected, clean, uniform = (self.mean(arm) for arm in (RELEASE, CLEAN, UNIFORM))
        spread = f" ± {self.sem(RELEASE):.1f}" if self.seeds > 1 else ""
        change = 100 * (protected - clean) / clean if clean else 0.0
        below = uniform - protected
        score = f"{protected:.1f}{spread}"
        if self.white_box:
            score = f"**{score}**"
        return (f"{score} ({self.seeds}); {change:+.0f}%, {abs(below):.1f} "
                f"{'below' if below >= 0 else 'above'} uniform{', WB' if self.white_box else ''}")


def release_key(setting: dict) -> str:
    """What identifies a release: method, options, budget and slice (not attackers, seeds)."""
    fields = {name: setting.get(name) for name in ("method", "options", "eps", "limit",
                                                     "holdout", "limit_test")}
    return json.dumps(fields, sort_keys=True, default=str)


def release_label(setting: dict) -> str:
    options = setting.get("options") or {}
    parts = [f"{name}={_short(value)}" for name, value in sorted(options.items())]
    if abs(setting.get("eps", 8 / 255) - 8 / 255) > 1e-9:
        parts.append(f"eps={round(setting['eps'] * 255)}/255")
    return f"`{setting['method']}`" + (f" [{', '.join(parts)}]" if parts else "")


def _short(value: object) -> str:
    if isinstance(value, list | tuple):
        return "+".join(str(item) for item in value)
    return str(value)


def surrogates_of(row: dict) -> set[str]:
    """The models the release was made on; empty for a model-free method."""
    optimisation = (row.get("protect") or {}).get("optimisation") or {}
    named = optimisation.get("surrogates") or (row["setting"].get("options") or {}).get(
        "surrogates") or []
    return {str(name) for name in ([named] if isinstance(named, str) else named)}


def collect(rows: list[dict], dataset: str, metric: str, score: str,
            evaluate_on: str) -> dict[str, dict[str, Cell]]:
    """{release label: {attacker model: Cell}}. Rows of one release split over seeds
    (one row per seed) join into one cell; a seed measured twice keeps the later row's."""
    matrix: dict[str, dict[str, Cell]] = {}
    labels: dict[str, str] = {}
    for row in rows:
        setting = row.get("setting") or {}
        if (setting.get("dataset") != dataset or setting.get("evaluate_on") != evaluate_on
                or setting.get("augment") or setting.get("strip_rare_words")):
            continue
        key = release_key(setting)
        made_on = surrogates_of(row)
        for spec, arms in (row.get("attackers") or {}).items():
            try:
                runs = [arms[arm][score][metric]["runs"] for arm in ARMS]
            except KeyError:
                continue  # unfinished attacker runs, or another metric (pairs rows)
            seeds = setting.get("seeds") or []
            if any(len(arm_runs) != len(seeds) for arm_runs in runs):
                continue
            model = spec.split(":")[0]
            labels.setdefault(key, release_label(setting))
            cell = matrix.setdefault(key, {}).setdefault(
                model, Cell({}, white_box=model in made_on))
            for index, seed in enumerate(seeds):
                cell.by_seed[seed] = tuple(arm_runs[index] for arm_runs in runs)
    return {labels[key]: cells for key, cells in matrix.items()}


def table(matrix: dict[str, dict[str, Cell]], metric: str) -> str:
    models = sorted({model for cells in matrix.values() for model in cells})
    lines = ["| release | " + " | ".join(f"`{model}`" for model in models) + " |",
             "|---|" + "---|" * len(models)]
    for label, cells in matrix.items():
        lines.append(f"| {label} | " + " | ".join(
            cells[model].text() if model in cells else "" for model in models) + " |")
    return "\n".join([
        f"Protected {metric} (seeds); change from clean on the same seeds; points below "
        "uniform noise in the same ball; **bold**, WB: the attacker's model is one the "
        "release was made on (white box).", "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        default=[RESULTS / name for name in DEFAULT_FILES])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--metric", default="exact_match")
    parser.add_argument("--score", choices=("final", "best"), default="final",
                        help="the attacker's last epoch, or its best over epochs")
    parser.add_argument("--on", default="test", help="evaluation split of the rows")
    args = parser.parse_args()
    rows = []
    for path in args.files:
        if not path.exists():
            parser.error(f"{path}: no such results file")
        try:
            rows.extend(load_results(path).get("rows", {}).values())
        except (json.JSONDecodeError, AttributeError) as error:
            parser.error(f"{path}: not a results file ({error})")
    matrix = collect(rows, args.dataset, args.metric, args.score, args.on)
    if not matrix:
        parser.error(f"no lab row on {args.dataset!r} ({args.on} split) with {args.metric!r}")
    text = (f"# Which attackers a release reaches: {args.dataset}\n\n"
            f"`benchmarks/transfer_matrix.py` over {', '.join(p.name for p in args.files)}; "
            f"{args.score} scores.\n\n" + table(matrix, args.metric) + "\n")
    out = RESULTS / f"transfer-{args.dataset}.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
