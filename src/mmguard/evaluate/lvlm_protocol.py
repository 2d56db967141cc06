"""The evaluation protocol for LVLM attackers: fine-tune on triples, answer clean test prompts.

    report = evaluate_lvlm(train, test, LVLMRecipe(model="smolvlm-lite"), seeds=[0, 1, 2],
                           baseline=clean_train)

Rows of the report, each scored on the same clean test triples:
- the untouched attacker (zero-shot): what the starting checkpoint already
  knows, so a protected row near it means fine-tuning taught nothing;
- the attacker fine-tuned on the clean training triples (with a baseline);
- the same attacker fine-tuned on the given (usually protected) triples,
once per seed, as mean and standard deviation; plus the random-guess and
majority levels of the test answers and, with a baseline, the degradation.
Every row also carries the attention TV distance between its training inputs
(for the untouched attacker: the given training set) and the clean test
inputs (see `vqa.attention_shift`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from mmguard.attack.lvlm import LVLMRecipe, build_attacker, fine_tune_lvlm
from mmguard.attack.triples import TripleSet, load_triples
from mmguard.data.records import Dataset
from mmguard.evaluate.protocol import (
    clean_swaps,
    mean_std_cell,
    over_seeds,
    percent,
    population_std,
)
from mmguard.evaluate.vqa import (
    ANSWER_METRICS,
    answer_accuracy,
    answer_degradation,
    attention_shift,
    generate_answers,
    reference_levels,
)
from mmguard.models.lvlm.base import LVLMAdapter

ROW_METRICS = ("exact_match", "contains_match", "tv_distance", "final_train_loss")


@dataclass
class AnswerEvaluation:
    """How answers and attention are measured (the same for every row)."""

    batch_size: int = 16
    max_new_tokens: int = 16
    attention_examples: int = 64  # first N train and N test examples for the TV distance; 0: none
    samples: int = 5  # first N test answers kept in the report, to read


def evaluate_answers(adapter: LVLMAdapter, test: TripleSet, train: TripleSet,
                     settings: AnswerEvaluation) -> dict:
    """Accuracy on `test`, the attention TV between `train` and `test` inputs, some samples."""
    images, examples = test.inputs()
    answers = generate_answers(adapter, images, examples, settings.batch_size,
                               settings.max_new_tokens)
    references = [example.response or "" for example in examples]
    metrics: dict = answer_accuracy(answers, references)
    count = settings.attention_examples
    if count > 0:  # 0: accuracy only (the lab scores every epoch and skips the attention)
        train_images, train_examples = train.inputs()
        metrics.update(attention_shift(adapter, (train_images[:count], train_examples[:count]),
                                       (images[:count], examples[:count]), settings.batch_size))
    metrics["samples"] = [{"prompt": e.prompt, "reference": r, "answer": a} for e, r, a in
                          list(zip(examples, references, answers, strict=True))[:settings.samples]]
    return metrics


def mix_clean_triples(protected: TripleSet, protected_dataset: Dataset, clean_dataset: Dataset,
                      fraction: float, seed: int) -> TripleSet:
    """Replace `fraction` of the protected images (and their prompts) by the clean originals."""
    swaps = clean_swaps(protected_dataset, clean_dataset, fraction, seed, len(protected.images))
    clean = load_triples(clean_dataset)
    images, turns = list(protected.images), list(protected.turns)
    for i, j in swaps:
        images[i], turns[i] = clean.images[j], clean.turns[j]
    return TripleSet(images, turns, list(protected.keys))


def run_lvlm_seeds(train: TripleSet, test: TripleSet, recipe: LVLMRecipe, seeds: list[int],
                   label: str, settings: AnswerEvaluation, log=print) -> dict:
    """Fine-tune a fresh attacker on `train` per seed and score it on `test`."""
    def run_one(seed: int) -> dict:
        adapter = build_attacker(recipe)
        training = fine_tune_lvlm(adapter, train, replace(recipe, seed=seed))
        metrics = evaluate_answers(adapter, test, train, settings)
        metrics.update(final_train_loss=round(training.epoch_losses[-1], 4),
                       loss_curve=[round(loss, 4) for loss in training.epoch_losses],
                       step_losses=[round(loss, 4) for loss in training.step_losses],
                       trained_parameters=training.trainable)
        return metrics

    def describe(m: dict) -> str:
        # The attention shift is measured only when settings.attention_examples > 0.
        attention = f"attention TV {m['tv_distance']:.3f}, " if "tv_distance" in m else ""
        return (f"exact {m['exact_match']:.1f}%, contains {m['contains_match']:.1f}%, "
                f"{attention}train loss {m['final_train_loss']:.3f}")

    runs = over_seeds(seeds, run_one, describe, label, log)
    measured = [m for m in ROW_METRICS if all(m in r for r in runs)]
    return {"runs": runs,
            "mean": {m: statistics.mean(r[m] for r in runs) for m in measured},
            "std": {m: population_std([r[m] for r in runs]) for m in measured}}


def evaluate_lvlm(train: TripleSet, test: TripleSet, recipe: LVLMRecipe, seeds: list[int],
                  baseline: TripleSet | None = None, settings: AnswerEvaluation | None = None,
                  log=print) -> dict:
    settings = settings or AnswerEvaluation()
    _, test_examples = test.inputs()
    report: dict = {
        "attacker": {**{k: v for k, v in vars(recipe).items() if k != "augment"},
                     "learning_rate": recipe.learning_rate},
        "augment": recipe.augment.spec if recipe.augment else None, "seeds": seeds,
        "evaluation": vars(settings),
        "train": {"images": len(train.images), "examples": len(train.examples())},
        "test": {"images": len(test.images), "examples": len(test_examples)},
        "reference": reference_levels([e.response or "" for e in test_examples]),
    }
    report["zero_shot"] = evaluate_answers(build_attacker(recipe), test, train, settings)
    log(f"zero-shot: exact {report['zero_shot']['exact_match']:.1f}%, contains "
        f"{report['zero_shot']['contains_match']:.1f}%")
    if baseline is not None:
        report["clean"] = run_lvlm_seeds(baseline, test, recipe, seeds, "clean", settings, log)
    report["protected"] = run_lvlm_seeds(train, test, recipe, seeds, "train", settings, log)
    if baseline is not None:
        report["degradation"] = answer_degradation(report["clean"]["mean"],
                                                   report["protected"]["mean"])
    return report


def lvlm_markdown_table(report: dict) -> str:
    """The report of `evaluate_lvlm` as a table: zero-shot, clean and given rows, levels."""
    rows = {"untouched (zero-shot)": report["zero_shot"],
            "fine-tuned on clean": report.get("clean"),
            "fine-tuned on given --train": report["protected"]}
    return answer_table({label: row for label, row in rows.items() if row}, report["reference"])


# Table columns: metric -> (header, decimals).
ANSWER_COLUMNS = {"exact_match": ("exact match %", 1), "contains_match": ("contains match %", 1),
                  "tv_distance": ("attention TV train↔test", 3),
                  "final_train_loss": ("final train loss", 3)}


def answer_table(rows: dict[str, dict], reference: dict, columns: tuple[str, ...] = ROW_METRICS,
                 first_header: str = "attacker", clean: str | None = None) -> str:
    """A row per attacker (label -> `run_lvlm_seeds` result, shown as mean ± std over seeds,
    or one run's metrics), then the random-guess and majority levels.

    With `clean` (the label of the clean-trained row), an exact-match degradation
    column follows the exact-match one, filled for the other fine-tuned rows.
    """
    headers = [first_header] + [ANSWER_COLUMNS[metric][0] for metric in columns]
    if clean is not None:
        headers.insert(2, "degradation")
    lines = [_markdown_row(headers), "|" + "---|" * len(headers)]
    clean_mean = _row_stats(rows[clean])[0] if clean is not None else None
    for label, row in rows.items():
        mean, std, runs = _row_stats(row)
        cells = [mean_std_cell(mean[m], std.get(m, 0.0), runs, ANSWER_COLUMNS[m][1])
                 if m in mean else "–" for m in columns]
        if clean is not None:
            fine_tuned = label != clean and "final_train_loss" in mean
            lost = answer_degradation(clean_mean, mean)["exact_match"] if fine_tuned else None
            cells.insert(1, "" if lost is None else percent(lost))
        lines.append(_markdown_row([label, *cells]))
    for label, level in ((f"random guess (1 of {reference['distinct_answers']} answers)",
                          reference["random"]), ("majority answer", reference["majority"])):
        cells = [f"{level:.1f}" if m in ANSWER_METRICS else "" for m in columns]
        if clean is not None:
            cells.insert(1, "")
        lines.append(_markdown_row([label, *cells]))
    return "\n".join(lines)


def _markdown_row(cells: list[str]) -> str:
    return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)


def _row_stats(row: dict) -> tuple[dict, dict, int]:
    """(mean, std, number of runs) of a `run_lvlm_seeds` result or of one run's metrics."""
    if "runs" in row:
        return row["mean"], row["std"], len(row["runs"])
    return row, {}, 1


def lvlm_summary(report: dict) -> str | None:
    """One line on how much protection cost the attacker, when there is a clean baseline."""
    if "degradation" not in report:
        return None
    deg = report["degradation"]
    return (f"degradation (1 - protected/clean): exact match {percent(deg['exact_match'])}, "
            f"contains match {percent(deg['contains_match'])}")
