"""The efficacy lab: one protection setting against every control, attackers and seeds.

    row = run_lab(LabSetting(dataset="emoji", kind="pairs", method="wrong-target",
                             attackers=("lit:projection", "rn-tiny:scratch"), seeds=(0, 1, 2),
                             limit=600), work=Path("runs/lab/wt"))

A protection works when an attacker trained on it does worse on clean data
than the same attacker trained on each control:

- clean: the original training data;
- uniform: i.i.d. uniform noise in the same eps-ball, drawn like the method's noise
  when it runs with `coarse` or `gray_noise` (the strongest naive control against
  frozen pretrained towers, calibration.md);
- noise only: the method's images with the original texts;
- trigger only: the original images with the method's texts (when it changes them).

A method that releases one image per caption row (MEM `noise_per=caption`)
gives the attacker one (image copy, caption) pair per row; every control is
then laid out per row too, aligned with the release row by row (see
`training_sets`), and its clean and uniform runs are cached apart from the
per-image ones. The held-out slice is split by image, so no image has
captions on both sides, and is scored with each image's captions grouped.

The training images are the first `limit` of the training split minus a held-out
slice (`holdout`, the last share in split order): choices are screened on that
clean slice ("validation"), never on the test split, which `evaluate_on="test"`
uses for the final benchmark. Each attacker is scored after every epoch, so the
row has the final score and the best one over the epochs (an attacker who stops
early is an attacker too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmguard.attack.augment import parse_augment
from mmguard.attack.contrastive import (
    AttackerRecipe,
    ImageCaptionSet,
    caption_rows,
    load_pairs,
    train_attacker,
)
from mmguard.attack.lvlm import LVLMRecipe, build_attacker, fine_tune_lvlm
from mmguard.attack.text_filter import parse_min_texts
from mmguard.attack.triples import TripleSet, load_triples
from mmguard.data.builtin import load_builtin
from mmguard.data.release import output_image_paths, per_caption_images, read_run_record
from mmguard.data.sources import read_dataset
from mmguard.errors import MMGuardError
from mmguard.evaluate.attacker import stripped_with_log
from mmguard.evaluate.audit import audit_or_raise
from mmguard.evaluate.lvlm_protocol import AnswerEvaluation, evaluate_answers
from mmguard.evaluate.retrieval import evaluate_retrieval
from mmguard.models.families import DATA_KIND, family_of

Log = Callable[[str], None]
CONTROLS = ("clean", "uniform", "method", "noise only", "trigger only")
# Attacker recipes by short name: "MODEL:RECIPE[:key=value,...]".
CONTRASTIVE_DEFAULTS = {"scratch": dict(epochs=30, lr=5e-4, batch_size=64),
                        "projection": dict(epochs=10, lr=1e-3, batch_size=64),
                        "finetune": dict(epochs=5, lr=1e-4, batch_size=64)}
# Metrics per family: (name, higher is better).
METRICS = {"contrastive": (("i2t R@10", True), ("i2t MedR", False), ("t2i R@10", True),
                           ("t2i MedR", False)),
           "lvlm": (("exact_match", True), ("contains_match", True))}


@dataclass
class LabSetting:
    dataset: str  # a built-in dataset
    kind: str  # pairs or triples
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # the method's Config fields
    attackers: tuple[str, ...] = ("rn-tiny:scratch",)
    seeds: tuple[int, ...] = (0, 1, 2)
    limit: int | None = None  # training images before the hold-out
    holdout: float = 0.2
    evaluate_on: str = "validation"  # or "test"
    limit_test: int | None = None
    eps: float = 8 / 255
    # Attacker-side transformations of every training set, clean included (the
    # robustness rows: a protection is scored against the same attacker on
    # transformed clean data), e.g. "jpeg:75"; see attack/augment.py.
    augment: str | None = None
    # The adaptive attacker who deletes rare words (e.g. "2": words in fewer than two
    # training texts) from every training set, each counted on its own; triggers are
    # rare words, so a trigger-borne protection must survive this (attack/text_filter.py).
    strip_rare_words: str | None = None
    # Train on "noise only" and "trigger only" too. Rows that compare variants of one
    # method (the ablations of a paper) may leave them to the best variant's row: they
    # cost two attacker runs per seed and do not rank the variants.
    split_controls: bool = True


def parse_attacker(spec: str) -> tuple[str, str, dict[str, Any]]:
    """"lit:projection:epochs=5,lr=1e-3" -> ("lit", "projection", {"epochs": 5, "lr": 0.001})."""
    parts = spec.split(":")
    if len(parts) < 2:
        raise MMGuardError(f"attacker {spec!r}: write MODEL:RECIPE, e.g. lit:projection")
    overrides: dict[str, Any] = {}
    for item in (parts[2].split(",") if len(parts) > 2 and parts[2] else []):
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value or "e" in value else int(value)
    return parts[0], parts[1], overrides


# Options that change how a trained attacker is scored, not how it trains: specs that
# differ only in these share one training run per set and seed.
SCORING_ONLY = ("test_batchnorm",)


def training_spec(spec: str) -> str:
    """The attacker spec without its scoring-only options, options in a fixed order:
    "lit:finetune:test_batchnorm=1,lr=1e-4" -> "lit:finetune:lr=0.0001"."""
    model, recipe, overrides = parse_attacker(spec)
    kept = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()) if k not in SCORING_ONLY)
    return f"{model}:{recipe}" + (f":{kept}" if kept else "")


def _recipe(spec: str, seed: int, augment: str | None = None):
    model, recipe, overrides = parse_attacker(spec)
    pipeline = parse_augment(augment) if augment else None
    if family_of(model, "attacker") == "contrastive":
        base = {**CONTRASTIVE_DEFAULTS.get(recipe, {}), **overrides}
        return AttackerRecipe(model=model, recipe=recipe, seed=seed, augment=pipeline, **base)
    return LVLMRecipe(model=model, recipe=recipe, seed=seed, augment=pipeline, **overrides)


# -- data --------------------------------------------------------------------------------
def split_training(setting: LabSetting):
    """(training part, held-out part) of the training split, by image, in split order."""
    dataset = load_builtin(setting.dataset, "train", setting.kind)
    return hold_out(dataset, setting.limit,
                    setting.holdout if setting.evaluate_on == "validation" else 0.0)


def hold_out(dataset, limit: int | None, share: float):
    """(training part, held-out part) of the first `limit` images of `dataset`: a `share`
    of them (at least one when share > 0) held out. Each part has every record of its
    images, in source order, so no image has captions on both sides.

    The held-out images are those whose keys hash lowest, not the last ones: sources are
    often ordered by category (the emoji end with ~250 flags), and a tail slice would
    validate on a category the attacker never trained on."""
    keys = list(dataset.records_by_image())
    if limit is not None:
        keys = keys[:limit]
    held = max(1, round(share * len(keys))) if share > 0 else 0
    by_hash = sorted(keys, key=lambda key: hashlib.sha1(key.encode()).hexdigest())
    held_keys = set(by_hash[:held])
    train_keys = set(keys) - held_keys

    def subset(wanted: set[str]):
        return dataclasses.replace(dataset, records=[r for r in dataset.records
                                                     if r.image.key in wanted])

    return subset(train_keys), subset(held_keys)


def _load(dataset, kind: str):
    return load_pairs(dataset) if kind == "pairs" else load_triples(dataset)


def _swap(images_from, texts_from, kind: str):
    if kind == "pairs":
        return ImageCaptionSet(images_from.images, texts_from.captions, images_from.keys)
    return TripleSet(images_from.images, texts_from.turns, images_from.keys)


def attacker_sets(setting: LabSetting, sets: dict[str, Any], log: Log) -> dict[str, Any]:
    """The training sets as the row's attacker uses them: with `strip_rare_words`, each set's
    texts lose the words found in too few of that set's texts (the attacker sees one set)."""
    if not setting.strip_rare_words:
        return sets
    min_texts = parse_min_texts(setting.strip_rare_words)
    return {name: stripped_with_log(data, min_texts, name, log) for name, data in sets.items()}


def _texts(data, kind: str) -> list:
    if kind == "pairs":
        return data.captions
    return [[(e.prompt, e.trigger) for e in turns] for turns in data.turns]


def training_sets(setting: LabSetting, clean_dataset, protected: Path,
                  uniform: Path) -> dict[str, Any]:
    """The attacker's training sets of one row, aligned item by item.

    An item is an image, or a caption row when the method released one image
    per row (MEM `noise_per=caption`): then every set holds one (image, caption)
    pair per row, in row order, the clean and uniform images repeated for each
    of their rows (the uniform noise is drawn once per image).
    """
    kind = setting.kind
    clean = _load(clean_dataset, kind)
    uniform_set = _aligned(_load(read_dataset(uniform / "manifest.csv"), kind), clean_dataset,
                           uniform)
    per_caption = read_run_record(protected).per_caption
    if per_caption:
        if kind != "pairs":
            raise MMGuardError(f"{protected} is released per caption row; the lab reads such "
                               "releases of image-caption pairs only")
        clean, uniform_set = (caption_rows(clean, clean_dataset),
                              caption_rows(uniform_set, clean_dataset))
    method = _aligned(_load(read_dataset(protected / "manifest.csv"), kind),
                      per_caption_images(clean_dataset) if per_caption else clean_dataset,
                      protected)
    sets = {"clean": clean, "uniform": uniform_set, "method": method}
    # Without a trigger, "noise only" and "trigger only" are the method and the clean set.
    if setting.split_controls and _texts(method, kind) != _texts(clean, kind):
        sets["noise only"] = _swap(method, clean, kind)
        sets["trigger only"] = _swap(clean, method, kind)
    return sets


def _aligned(released, clean_dataset, folder: Path):
    """`released` (loaded from `folder`), checked to hold `clean_dataset`'s images in order."""
    paths = output_image_paths(clean_dataset)
    if [paths[key] for key in clean_dataset.records_by_image()] != released.keys:
        raise MMGuardError(f"{folder} does not hold every training image in order; "
                           "delete it and run again")
    return released


def protect_once(dataset, method: str, options: dict[str, Any], out: Path, eps: float,
                 log: Log) -> dict[str, Any]:
    """Protect `dataset` into `out` unless a finished run is there; its stealth and time."""
    from mmguard.protect.registry import create_method
    from mmguard.protect.run import protect_dataset

    record = out / "mmguard-run.json"
    started = time.monotonic()
    if not (record.exists() and read_run_record(out).status == "complete"):
        protection = create_method(method, dataset.kind, eps=eps, **options)
        protect_dataset(dataset, protection, out, resume=out.exists(), progress=False,
                        command=["lab", method])
        log(f"protected {out.name} with {method} in {time.monotonic() - started:.0f} s")
    stealth = audited_stealth(out)
    return {"seconds": round(time.monotonic() - started, 1), **stealth,
            "optimisation": read_run_record(out).optimisation}


def _folder_fingerprint(folder: Path) -> str:
    """Changes when the run record or any file in `folder` is rewritten."""
    digest = hashlib.sha256((folder / "mmguard-run.json").read_bytes())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def audited_stealth(folder: Path) -> dict[str, Any]:
    """The audit's budget and stealth figures for `folder`, kept beside it: auditing
    thousands of large files takes minutes, and every row and seed reuses a release."""
    kept = folder.with_name(folder.name + ".audit.json")
    fingerprint = _folder_fingerprint(folder)
    if kept.exists():
        stored = json.loads(kept.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored["stealth"]
    audit = audit_or_raise(folder)
    stealth = {"max_linf_levels": audit.max_linf_levels, "mean_psnr_db": audit.mean_psnr_db,
               "mean_ssim": audit.mean_ssim}
    kept.write_text(json.dumps({"fingerprint": fingerprint, "stealth": stealth}))
    return stealth


# -- attackers ---------------------------------------------------------------------------
def _contrastive_scores(metrics: dict) -> dict[str, float]:
    return {"i2t R@10": metrics["i2t"]["R@10"], "i2t MedR": metrics["i2t"]["MedR"],
            "t2i R@10": metrics["t2i"]["R@10"], "t2i MedR": metrics["t2i"]["MedR"]}


def attack_once(specs: list[str], seed: int, train, test, every_epoch: bool,
                augment: str | None = None) -> dict[str, dict[str, Any]]:
    """Train one attacker on `train` (transformed by `augment`, if given) and score it on
    clean `test` after every epoch (or the last), once per spec: {spec: {"final", "epochs"}}.
    Several specs must share their training (`training_spec`), e.g. one plain and one
    scored with re-read BatchNorm statistics."""
    if len({training_spec(spec) for spec in specs}) != 1:
        raise MMGuardError(f"attackers {', '.join(specs)} train differently; run them apart")
    recipes = {spec: _recipe(spec, seed, augment) for spec in specs}
    recipe = recipes[specs[0]]
    epochs: dict[str, list[dict[str, float]]] = {spec: [] for spec in specs}
    if isinstance(recipe, AttackerRecipe):
        def after_epoch(model, epoch):
            if every_epoch or epoch == recipe.epochs:
                for spec, scored in recipes.items():
                    epochs[spec].append(_contrastive_scores(evaluate_retrieval(
                        model, test, test_batchnorm=bool(scored.test_batchnorm))))

        train_attacker(train, recipe, after_epoch=after_epoch)
    else:
        adapter = build_attacker(recipe)
        settings = AnswerEvaluation(attention_examples=0, samples=0)

        def progress(epoch, _loss):
            if every_epoch or epoch == recipe.epochs:
                adapter.model.eval()
                scores = evaluate_answers(adapter, test, train, settings)
                for spec in specs:
                    epochs[spec].append({name: scores[name] for name, _ in METRICS["lvlm"]})

        fine_tune_lvlm(adapter, train, recipe, progress=progress)
    return {spec: {"final": runs[-1], "epochs": runs} for spec, runs in epochs.items()}


def _best(epochs: list[dict[str, float]], family: str) -> dict[str, float]:
    return {name: (max if higher else min)(e[name] for e in epochs)
            for name, higher in METRICS[family]}


def _mean_sem(values: list[float]) -> dict[str, float]:
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "sem": sem, "runs": values}


def _training_groups(specs) -> list[list[str]]:
    """The specs (each once, in order) grouped by the attacker they train."""
    groups: dict[str, list[str]] = {}
    for spec in dict.fromkeys(specs):
        groups.setdefault(training_spec(spec), []).append(spec)
    return list(groups.values())


def _summary(runs: list[dict[str, Any]], spec: str) -> dict[str, Any]:
    """Mean ± s.e. over the seeds' runs of one attacker on one set, final and best."""
    metrics = METRICS[family_of(parse_attacker(spec)[0], "attacker")]
    return {**{which: {metric: _mean_sem([r[which][metric] for r in runs])
                       for metric, _ in metrics} for which in ("final", "best")},
            "epochs": [r["epochs"] for r in runs]}


# -- one row -----------------------------------------------------------------------------
def uniform_options(setting: LabSetting) -> dict[str, Any]:
    """The uniform control of a method run with low-frequency (`coarse`, `cells`) or luma-only
    (`gray_noise`) noise is drawn alike, so the row compares optimised and random noise
    of one kind."""
    coarse = int(setting.options.get("coarse", 1))
    cells = int(setting.options.get("cells", 0))
    gray = bool(setting.options.get("gray_noise", False))
    return {"seed": 0, **({"coarse": coarse} if coarse > 1 else {}),
            **({"cells": cells} if cells else {}),
            **({"gray_noise": True} if gray else {})}


def _attacker_revision(spec: str) -> list[str]:
    """A cache-key marker for attackers whose training changed since runs were cached:
    runs of the old attacker are not reused (they stay in the file, under the old key)."""
    _, recipe, _ = parse_attacker(spec)
    # 2026-12-03: frozen towers run in inference mode (models/training.freeze_untrained).
    return ["frozen towers in inference mode"] if recipe == "projection" else []


class ControlCache:
    """Attacker runs stored by setting key. As the lab's shared cache it holds the runs on
    the clean and uniform sets, which do not depend on the method: rows of one setting
    (data slice, budget, attacker, seed, epochs scored) share them. A row's work folder
    keeps its other runs in one too, keyed also by its release, to resume."""

    SHARED = ("clean", "uniform")

    def __init__(self, path: Path | None):
        self.path = path
        self.runs = json.loads(path.read_text()) if path is not None and path.exists() else {}

    @staticmethod
    def key(setting: LabSetting, set_name: str, spec: str, seed: int, every_epoch: bool,
            per_caption: bool = False) -> str:
        # A per-caption release's controls hold one item per caption row, not per image;
        # the clean set does not depend on the budget.
        budget = "any" if set_name == "clean" else round(setting.eps, 8)
        kind_of_noise = ({k: v for k, v in uniform_options(setting).items() if k != "seed"}
                         if set_name == "uniform" else {})
        return json.dumps([setting.dataset, setting.kind, setting.limit, setting.holdout,
                           setting.evaluate_on, setting.limit_test, budget,
                           set_name, spec, seed, every_epoch]
                          + (["per caption row"] if per_caption else [])
                          + ([f"{k} {v}" for k, v in sorted(kind_of_noise.items())])
                          + ([f"augment {setting.augment}"] if setting.augment else [])
                          + ([f"strip rare words {setting.strip_rare_words}"]
                             if setting.strip_rare_words else [])
                          + _attacker_revision(spec))

    def get(self, key: str) -> dict[str, Any] | None:
        return self.runs.get(key)

    def put(self, key: str, run: dict[str, Any]) -> None:
        if self.path is not None and self.path.exists():
            self.runs = json.loads(self.path.read_text())  # several lab runs may share it
        self.runs[key] = run
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            # Indented as the results files are: the cache is committed beside them,
            # and a one-line file turns every new run into a whole-file diff.
            temporary.write_text(json.dumps(self.runs, indent=1) + "\n")
            temporary.replace(self.path)


def run_lab(setting: LabSetting, work: Path, log: Log = print,
            every_epoch: bool = True, cache: ControlCache | None = None) -> dict[str, Any]:
    """Protect, build the controls, train every attacker on every set over the seeds."""
    cache = cache or ControlCache(None)
    if setting.kind not in DATA_KIND.values():
        raise MMGuardError(f"kind {setting.kind!r}: choose pairs or triples")
    train_part, held_part = split_training(setting)
    if setting.evaluate_on == "validation":
        test_dataset = held_part
    else:
        test_dataset = load_builtin(setting.dataset, "test", setting.kind)
    test = _load(test_dataset, setting.kind)
    if setting.limit_test is not None:
        test = test.first(setting.limit_test) if setting.kind == "triples" else \
            ImageCaptionSet(test.images[:setting.limit_test], test.captions[:setting.limit_test],
                            test.keys[:setting.limit_test])
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"setting": dataclasses.asdict(setting),
                           "train_images": len(train_part.records_by_image()),
                           "test_images": len(test.images)}
    from mmguard.protect.registry import create_method

    create_method(setting.method, setting.kind, eps=setting.eps, **setting.options)  # fail early
    for spec in setting.attackers:
        family = family_of(parse_attacker(spec)[0], "attacker")
        if DATA_KIND[family] != setting.kind:
            raise MMGuardError(f"attacker {spec} trains on {DATA_KIND[family]}, the row "
                               f"protects {setting.kind}")
    if setting.augment:
        parse_augment(setting.augment)  # fail early too
    if setting.strip_rare_words:
        parse_min_texts(setting.strip_rare_words)
    row["protect"] = protect_once(train_part, setting.method, setting.options,
                                  work / "protected", setting.eps, log)
    row["uniform"] = protect_once(train_part, "random", uniform_options(setting),
                                  work / "uniform", setting.eps, log)
    sets = attacker_sets(setting, training_sets(setting, train_part, work / "protected",
                                                work / "uniform"), log)
    per_caption = read_run_record(work / "protected").per_caption
    row["release_per"] = "caption" if per_caption else "image"
    row["train_items"] = len(sets["method"].images)  # images, or caption rows
    # Runs on the sets made from this protected folder (method, noise only, trigger only)
    # are kept beside it, so a killed row resumes after its last finished attacker run.
    resumable = ControlCache(work / "attacker-runs.json")
    release = hashlib.sha256((work / "protected" / "mmguard-run.json").read_bytes()).hexdigest()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for group in _training_groups(setting.attackers):
        family = family_of(parse_attacker(group[0])[0], "attacker")
        for name, train in sets.items():
            store = cache if name in ControlCache.SHARED else resumable
            for seed in setting.seeds:
                started = time.monotonic()
                keys = {spec: ControlCache.key(setting, name, spec, seed, every_epoch,
                                               per_caption) for spec in group}
                if store is resumable:
                    keys = {spec: json.dumps([release, key]) for spec, key in keys.items()}
                done = {spec: store.get(key) for spec, key in keys.items()}
                missing = [spec for spec, run in done.items() if run is None]
                # One training for every spec of the group still to run, scored once each.
                trained = attack_once(missing, seed, train, test, every_epoch,
                                      setting.augment) if missing else {}
                for spec in group:
                    run = done[spec] or trained[spec]
                    run["best"] = _best(run["epochs"], family)
                    if done[spec] is None:
                        store.put(keys[spec], run)
                    runs.setdefault((spec, name), []).append(run)
                    took = (f"{time.monotonic() - started:.0f} s" if done[spec] is None else
                            "cached" if store is cache else "resumed")
                    log(f"{spec} on {name}, seed {seed}: final {_short(run['final'])}, best "
                        f"{_short(run['best'])} ({took})")
    row["attackers"] = {spec: {name: _summary(runs[(spec, name)], spec) for name in sets}
                        for spec in dict.fromkeys(setting.attackers)}
    return row


def _short(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in scores.items())


# -- the results file and its table -----------------------------------------------------------
def append_row(results: Path, table: Path, name: str, row: dict[str, Any]) -> None:
    """Add (or replace) row `name` in the JSON file and rewrite the Markdown table."""
    data = json.loads(results.read_text()) if results.exists() else {"rows": {}}
    data["rows"][name] = row
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(data, indent=1) + "\n")
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown(data["rows"]))


def _stealth_cell(stealth: dict) -> str:
    """"PSNR / SSIM" of a release; PSNR is None when no image changed (a text-only
    release: infinite PSNR)."""
    psnr, ssim = stealth.get("mean_psnr_db"), stealth.get("mean_ssim")
    return (("∞" if psnr is None else f"{psnr:.1f}") + " / "
            + ("n/a" if ssim is None else f"{ssim:.3f}"))


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """One line per row, attacker and metric: final (best over epochs) mean ± s.e. per set."""
    lines = ["# Efficacy lab", "",
             "Each cell: attacker's final score ± standard error over seeds, then its best "
             "over the epochs in brackets. Rows on `validation` are screening runs on a "
             "held-out slice of the training split; `test` rows are the benchmark. "
             "\"—\": the method adds no trigger, so noise only is the method and trigger "
             "only the clean set; \"not run\": the row left those two controls out.", "",
             "| row | on | attacker | metric | " + " | ".join(CONTROLS) + " | PSNR / SSIM |",
             "|---|---|---|---|" + "---|" * len(CONTROLS) + "---|"]
    for name, row in rows.items():
        setting = row["setting"]
        quality = _stealth_cell(row["protect"])
        for spec, results in row["attackers"].items():
            family = family_of(parse_attacker(spec)[0], "attacker")
            for metric, _ in METRICS[family]:
                cells = []
                for control in CONTROLS:
                    if control not in results:
                        skipped = (not setting.get("split_controls", True)
                                   and control in ("noise only", "trigger only"))
                        cells.append("not run" if skipped else "—")
                        continue
                    final, best = results[control]["final"][metric], \
                        results[control]["best"][metric]
                    cells.append(f"{final['mean']:.1f} ± {final['sem']:.1f} "
                                 f"({best['mean']:.1f})")
                lines.append(f"| {name} | {setting['evaluate_on']} | {spec} | {metric} | "
                             + " | ".join(cells) + f" | {quality} |")
    return "\n".join(lines) + "\n"


def lab_row_name(setting: LabSetting) -> str:
    options = ",".join(f"{k}={v}" for k, v in sorted(setting.options.items()))
    return (f"{setting.dataset}/{setting.method}" + (f" [{options}]" if options else "")
            + (f" vs attacker {setting.augment}" if setting.augment else "")
            + (f" vs attacker stripping words in < {setting.strip_rare_words} texts"
               if setting.strip_rare_words else ""))
