"""Does protection work? Train an attacker of either family on named data and report.

    result = evaluate_attacker(AttackerEvaluation(train="protected/manifest.csv",
                                                  test="emoji:test", baseline_train="emoji:train",
                                                  attacker="rn-tiny", seeds=[0, 1, 2]))
    print(result.table)

This is `mmguard evaluate` without the command line. The attacker's family
(`models.families.family_of`, or without an attacker the kind of the training
data) picks a `FamilyProtocol`: how that family loads data, trains and scores
attackers, and prints its table. Everything else — naming data, checking it
fits the attacker, mixing clean images back in, stripping rare words — is the
same for both and done here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmguard.attack.augment import AugmentPipeline, parse_augment
from mmguard.attack.contrastive import RECIPES, AttackerRecipe, load_pairs
from mmguard.attack.lvlm import LVLM_RECIPES, LVLMRecipe
from mmguard.attack.text_filter import parse_min_texts, strip_training_set
from mmguard.attack.triples import load_triples
from mmguard.data.records import Dataset
from mmguard.data.resolve import resolve_dataset
from mmguard.errors import MMGuardError
from mmguard.evaluate.lvlm_protocol import (
    AnswerEvaluation,
    evaluate_lvlm,
    lvlm_markdown_table,
    lvlm_summary,
    mix_clean_triples,
)
from mmguard.evaluate.protocol import (
    contrastive_summary,
    evaluate_contrastive,
    markdown_table,
    mix_clean,
    require_kind,
)
from mmguard.models.families import DATA_KIND, FAMILY_OF_KIND, Family, family_of

Log = Callable[[str], None]


@dataclass
class AttackerEvaluation:
    """What to evaluate: the options of `mmguard evaluate`, with the same names and defaults.

    Options left None take the attacker family's defaults. `augment`,
    `mix_clean` and `strip_rare_words` are the option texts (e.g. "jpeg:75",
    "clean/manifest.csv:0.5", "2"); the report keeps them as given.
    """

    train: str  # manifest path or NAME:SPLIT of a built-in dataset
    test: str
    attacker: str | None = None  # None: the family's default for the training data's kind
    recipe: str | None = None
    baseline_train: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    augment: str | None = None
    mix_clean: str | None = None
    strip_rare_words: str | None = None
    device: str = "cpu"
    # contrastive attackers only
    pretrained: str | None = None
    test_batchnorm: bool = False
    # LVLM attackers only
    limit_train: int | None = None
    limit_test: int | None = None
    max_new_tokens: int | None = None
    lora_rank: int | None = None
    projector: str | None = None
    command: list[str] | None = None  # recorded in the report

    def training_overrides(self) -> dict:
        return {name: value for name, value in (("epochs", self.epochs), ("lr", self.lr),
                                                ("batch_size", self.batch_size))
                if value is not None}


@dataclass
class AttackerReport:
    report: dict  # everything measured (per seed, mean, std, reference levels), for JSON
    table: str  # markdown table of the rows
    summary: str | None  # one line on the degradation, when there was a clean baseline


@dataclass(frozen=True)
class FamilyProtocol:
    """What differs between the attacker families; `evaluate_attacker` does the rest."""

    name: str  # as in "for LVLM attackers"
    noun: str  # as in "rn-tiny is a contrastive model"
    default_attacker: str
    recipes: tuple[str, ...]
    options: tuple[str, ...]  # AttackerEvaluation fields that only this family uses
    min_batch_size: int
    # (dataset, first N images or None) -> the decoded set the attacker trains or is tested on
    load: Callable[[Dataset, int | None], Any]
    # (protected set, its dataset, clean dataset, fraction, seed) -> the mixed set
    mix_clean: Callable[[Any, Dataset, Dataset, float, int], Any]
    # (spec, attacker name, augmentation, train, test, baseline or None, log) -> report
    run: Callable[[AttackerEvaluation, str, AugmentPipeline | None, Any, Any, Any, Log], dict]
    table: Callable[[dict], str]
    summary: Callable[[dict], str | None]


def _run_contrastive(spec: AttackerEvaluation, attacker: str, augment, train, test, baseline,
                     log: Log) -> dict:
    recipe = AttackerRecipe(model=attacker, recipe=spec.recipe or "scratch",
                            pretrained=spec.pretrained, device=spec.device, augment=augment,
                            test_batchnorm=spec.test_batchnorm, **spec.training_overrides())
    return evaluate_contrastive(train, test, recipe, spec.seeds, baseline, log=log)


def _run_lvlm(spec: AttackerEvaluation, attacker: str, augment, train, test, baseline,
              log: Log) -> dict:
    lora = ({"lora_rank": spec.lora_rank, "lora_alpha": 2 * spec.lora_rank}
            if spec.lora_rank else {})
    recipe = LVLMRecipe(model=attacker, recipe=spec.recipe or "lora", device=spec.device,
                        augment=augment, projector=spec.projector,
                        **spec.training_overrides(), **lora)
    settings = AnswerEvaluation(**({"max_new_tokens": spec.max_new_tokens}
                                   if spec.max_new_tokens else {}))
    return evaluate_lvlm(train, test, recipe, spec.seeds, baseline, settings, log=log)


PROTOCOLS: dict[Family, FamilyProtocol] = {
    "contrastive": FamilyProtocol(
        name="contrastive", noun="a contrastive model", default_attacker="rn-tiny",
        recipes=RECIPES, options=("pretrained", "test_batchnorm"), min_batch_size=2,
        load=lambda dataset, limit: load_pairs(dataset), mix_clean=mix_clean,
        run=_run_contrastive, table=markdown_table, summary=contrastive_summary),
    "lvlm": FamilyProtocol(
        name="LVLM", noun="an LVLM", default_attacker="smolvlm-lite", recipes=LVLM_RECIPES,
        options=("limit_train", "limit_test", "max_new_tokens", "lora_rank", "projector"),
        min_batch_size=1, load=load_triples, mix_clean=mix_clean_triples, run=_run_lvlm,
        table=lvlm_markdown_table, summary=lvlm_summary),
}


def evaluate_attacker(spec: AttackerEvaluation, log: Log = print) -> AttackerReport:
    """Train the attacker on `spec.train` (and `spec.baseline_train`) once per seed and
    score it on `spec.test`; progress lines go to `log`."""
    if not spec.seeds:
        raise MMGuardError("--seeds needs at least one seed")
    augment = parse_augment(spec.augment) if spec.augment else None
    min_texts = parse_min_texts(spec.strip_rare_words) if spec.strip_rare_words else None
    mix = parse_mix_clean(spec.mix_clean) if spec.mix_clean else None
    if spec.attacker is not None:
        family = family_of(spec.attacker, "attacker")
        train_dataset = resolve_dataset(spec.train, DATA_KIND[family])
    else:  # built-in data is read as pairs, a manifest says what it holds
        train_dataset = resolve_dataset(spec.train)
        family = FAMILY_OF_KIND[train_dataset.kind]
    protocol = PROTOCOLS[family]
    attacker = spec.attacker or protocol.default_attacker
    _check_options(spec, protocol, attacker)
    kind = DATA_KIND[family]

    def load(source: str, dataset: Dataset | None = None, limit: int | None = None):
        dataset = dataset or resolve_dataset(source, kind)
        return protocol.load(require_kind(dataset, kind, attacker), limit)

    train = load(spec.train, train_dataset, spec.limit_train)
    if mix:
        clean = require_kind(resolve_dataset(mix[0], kind), kind, attacker)
        train = protocol.mix_clean(train, train_dataset, clean, mix[1], spec.seeds[0])
    baseline = (load(spec.baseline_train, limit=spec.limit_train) if spec.baseline_train
                else None)
    if min_texts is not None:
        train = stripped_with_log(train, min_texts, spec.train, log)
        if baseline is not None:
            baseline = stripped_with_log(baseline, min_texts, spec.baseline_train, log)
    test = load(spec.test, limit=spec.limit_test)
    report = protocol.run(spec, attacker, augment, train, test, baseline, log)
    report.update(train=spec.train, test_data=spec.test, mix_clean=spec.mix_clean,
                  strip_rare_words=spec.strip_rare_words, command=spec.command)
    return AttackerReport(report, protocol.table(report), protocol.summary(report))


def _check_options(spec: AttackerEvaluation, protocol: FamilyProtocol, attacker: str) -> None:
    """Refuse, before any training, options that belong to the other family."""
    if spec.recipe is not None and spec.recipe not in protocol.recipes:
        other = next((p for p in PROTOCOLS.values() if spec.recipe in p.recipes), None)
        used_by = f"is for {other.name} attackers" if other else "is not a recipe"
        raise MMGuardError(f"--recipe {spec.recipe} {used_by}; {attacker} is {protocol.noun} "
                           f"(recipes: {', '.join(protocol.recipes)})")
    for other in PROTOCOLS.values():
        given = [name for name in other.options
                 if name not in protocol.options
                 and getattr(spec, name) not in (None, False)]  # False: a flag not given
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise MMGuardError(f"{flags} {verb} to {other.name} attackers; {attacker} is "
                               f"{protocol.noun}")
    if spec.batch_size is not None and spec.batch_size < protocol.min_batch_size:
        raise MMGuardError(f"--batch-size: a {protocol.name} batch needs at least "
                           f"{protocol.min_batch_size} images")


def stripped_with_log(data, min_texts: float, name: str, log: Log):
    """The training set with rare words stripped from its text, and a log line saying how many."""
    data, report = strip_training_set(data, min_texts)
    log(f"{name}: {report.describe()}")
    return data


def parse_mix_clean(text: str) -> tuple[str, float]:
    """--mix-clean MANIFEST:FRACTION -> (manifest or NAME:SPLIT, fraction)."""
    spec, _, fraction = text.rpartition(":")
    try:
        return spec, float(fraction)
    except ValueError:
        raise MMGuardError(f"--mix-clean {text!r}: expected MANIFEST:FRACTION") from None
