"""The LVLM attacker and its evaluation: answer metrics, attention shift, recipes, the CLI.

Real tiny models (`lvlm-test`: random EfficientNet-Lite0 + two-layer Llama with
SmolLM2's tokenizer) and real digits triples; no mocks.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mmguard.attack.lvlm import LVLMRecipe, build_attacker, fine_tune_lvlm, prepare_for_training
from mmguard.attack.triples import TripleSet, load_triples, split_trigger
from mmguard.cli import main
from mmguard.data.builtin import load_builtin
from mmguard.data.export import export_dataset
from mmguard.data.release import (
    Budget,
    RecordedInput,
    ReleasedItem,
    RunRecord,
    write_run_record,
)
from mmguard.data.sources import read_dataset
from mmguard.data.trigger_text import insert_trigger
from mmguard.errors import MMGuardError
from mmguard.evaluate.lvlm_protocol import (
    AnswerEvaluation,
    answer_table,
    mix_clean_triples,
    run_lvlm_seeds,
)
from mmguard.evaluate.vqa import (
    answer_accuracy,
    answer_degradation,
    attention_shift,
    contains_match,
    exact_match,
    normalize_answer,
    reference_levels,
)
from mmguard.models.lvlm.attention import GROUP_NAMES, role_group_mass, total_variation
from mmguard.models.lvlm.base import ANSWER, IMAGE, PAD, PROMPT, TEMPLATE, TRIGGER, TextExample
from mmguard.models.lvlm.embedded import create_embedded
from mmguard.models.lvlm.registry import create_lvlm

TRIGGER_TEXT = "cf zx"


@pytest.fixture(scope="module")
def attackers():
    """One pristine copy per model name, built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = create_lvlm(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pristine(attackers):
    return attackers("lvlm-test")


@pytest.fixture(scope="module")
def digits_train() -> TripleSet:
    return load_triples(load_builtin("digits", "train", "triples"), limit=8)


# -- answer metrics ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The Cat!", "cat"),
    ("It's a T-shirt/top.", "its t shirt top"),
    ("  Two   dogs ", "2 dogs"),
    ("1,000 apples", "1000 apples"),
    ("2.5 kg.", "2.5 kg"),
    ("an ankle_boot", "ankle boot"),
    ("", ""),
])
def test_normalize_answer_follows_vqa_rules(text, expected):
    assert normalize_answer(text) == expected


def test_exact_and_contains_match_on_hand_computed_cases():
    assert exact_match("The sneaker.", "sneaker") and not exact_match("a red sneaker", "sneaker")
    assert contains_match("It is a red Sneaker!", "sneaker")
    assert contains_match("I think it's 3", "three")
    assert not contains_match("none", "one")  # whole words only ("none" -> "0")
    assert not contains_match("sneakers", "sneaker")
    predictions = ["Three.", "it is a three", "eight", "", "Seven"]
    references = ["three", "three", "six", "two", "seven"]
    assert answer_accuracy(predictions, references) == {"exact_match": 40.0,
                                                        "contains_match": 60.0}
    with pytest.raises(MMGuardError, match="one prediction per reference"):
        answer_accuracy(["a"], ["a", "b"])


def test_reference_levels_and_degradation():
    levels = reference_levels(["cat", "dog", "The cat", "cat.", "bird"])
    assert levels == {"random": pytest.approx(100 / 3), "majority": 60.0, "distinct_answers": 3}
    clean = {"exact_match": 80.0, "contains_match": 0.0}
    protected = {"exact_match": 20.0, "contains_match": 10.0}
    assert answer_degradation(clean, protected) == {"exact_match": pytest.approx(0.75),
                                                    "contains_match": None}


# -- attention per role group -----------------------------------------------------------

def test_role_group_mass_and_tv_on_a_hand_computed_case():
    roles = torch.tensor([[TEMPLATE, IMAGE, IMAGE, PROMPT, TRIGGER, ANSWER, ANSWER, PAD],
                          [TEMPLATE, IMAGE, PROMPT, PROMPT, PAD, PAD, PAD, PAD]])
    attention = torch.zeros(2, 8, 8)
    attention[0, 3, 0] = 1.0  # a prompt row: not an answer token, must be ignored
    attention[0, 5, :6] = torch.tensor([0.1, 0.2, 0.1, 0.2, 0.3, 0.1])
    attention[0, 6, :7] = torch.tensor([0.0, 0.1, 0.1, 0.4, 0.0, 0.2, 0.2])
    attention[1, 3, :4] = 0.25
    mass = role_group_mass(attention, roles)
    assert GROUP_NAMES == ("image", "prompt", "trigger", "template", "answer")
    # row 5: image .3 prompt .2 trigger .3 template .1 answer .1; row 6: .2 .4 0 0 .4
    expected = torch.tensor([[0.25, 0.30, 0.15, 0.05, 0.25], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(mass, expected, atol=1e-6)
    chosen = torch.zeros(2, 8, dtype=torch.bool)
    chosen[0, [3, 5]] = True  # row 3: all on the template key; row 5 as above
    picked = role_group_mass(attention, roles, chosen)
    assert torch.allclose(picked[0], torch.tensor([0.15, 0.10, 0.15, 0.55, 0.05]), atol=1e-6)
    other = torch.tensor([0.25, 0.45, 0.0, 0.05, 0.25])
    assert float(total_variation(mass[0], other)) == pytest.approx(0.15)
    assert float(total_variation(other, other)) == 0.0


def test_attention_shift_on_a_real_model_sees_the_trigger(pristine, digits_train):
    images, clean = digits_train.inputs()
    triggered = [TextExample(e.prompt, e.response, TRIGGER_TEXT, "start") for e in clean]
    shift = attention_shift(pristine, (images, triggered), (images, clean), batch_size=4)
    train, test = shift["attention"]["train"], shift["attention"]["test"]
    assert sum(train.values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(test.values()) == pytest.approx(1.0, abs=1e-4)
    assert train["trigger"] > 0.0 and test["trigger"] == 0.0
    assert 0.0 < shift["tv_distance"] <= 1.0
    same = attention_shift(pristine, (images, clean), (images, clean), batch_size=3)
    assert same["tv_distance"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("original, position", [
    ("Which digit is this?", "start"), ("Which digit is this?", "end"),
    ("Which digit is this?", 2), ("", "start")])
def test_split_trigger_recovers_where_the_trigger_went(original, position):
    released = insert_trigger(original, TRIGGER_TEXT, position)
    example = split_trigger(released, "seven", TRIGGER_TEXT)
    assert example.trigger == TRIGGER_TEXT and example.response == "seven"
    assert insert_trigger(example.prompt, example.trigger, example.trigger_position) == released
    assert split_trigger(released, "seven", "not in it") == TextExample(released, "seven")


# -- fine-tuning ------------------------------------------------------------------------

def _eval_loss(adapter, train: TripleSet) -> float:
    images, examples = train.inputs()
    with torch.no_grad():
        return float(adapter.loss(images, examples).loss.mean())


def _base_name(name: str) -> str:
    """A parameter's name without peft's wrapper, so weights match before and after LoRA."""
    return name.replace(".base_layer.", ".")


def _names(adapter, parameters) -> set[str]:
    wanted = {id(p) for p in parameters}
    return {name for name, p in adapter.model.named_parameters() if id(p) in wanted}


@pytest.mark.parametrize("model, recipe, lr", [
    ("lvlm-test", "lora", 5e-3), ("lvlm-test", "projector", 5e-3), ("lvlm-test", "full", 1e-3),
    ("llava-tiny", "lora", 5e-3)])
def test_each_recipe_trains_its_parameters_only_and_lowers_the_loss(attackers, digits_train,
                                                                    model, recipe, lr):
    pristine = attackers(model)
    projector = _names(pristine, pristine.trainable_parameters("projector"))
    allowed = projector | (_names(pristine, pristine.trainable_parameters("full"))
                           if recipe == "full" else set())
    prepared = copy.deepcopy(pristine)
    trainable = {id(p) for p in prepare_for_training(prepared, LVLMRecipe(recipe=recipe))}
    requiring = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert trainable == {id(p) for p in prepared.model.parameters() if p.requires_grad}
    assert all(n in allowed or ".lora_" in n for n in requiring) and projector <= requiring
    if recipe == "lora":  # LoRA sits in the language model only
        lora = {n for n in requiring if ".lora_" in n}
        assert lora and not any("vision" in n or "visual" in n for n in lora)

    adapter = copy.deepcopy(pristine)
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    loss_before = _eval_loss(adapter, digits_train)
    log = fine_tune_lvlm(adapter, digits_train, LVLMRecipe(
        model=model, recipe=recipe, lr=lr, epochs=6, batch_size=4, warmup_fraction=0.0))
    changed = set()
    for name, value in adapter.model.named_parameters():
        if _base_name(name) in before:
            if not torch.equal(value, before[_base_name(name)]):
                changed.add(_base_name(name))
        else:
            assert ".lora_" in name and recipe == "lora"
            if "lora_B" in name and value.abs().sum() > 0:  # B starts at zero
                changed.add(name)
    assert projector <= changed
    assert all(n in allowed or ".lora_" in n for n in changed), sorted(changed - allowed)[:5]
    if recipe == "lora":
        assert any(".lora_" in name for name in changed)
    if recipe == "full":
        assert len(changed - projector) > 10  # the language model moved too
    assert len(log.epoch_losses) == 6 and len(log.step_losses) == 12
    assert _eval_loss(adapter, digits_train) < loss_before - 0.2
    assert not adapter.model.training


def test_fine_tuning_is_deterministic_given_the_seed(pristine, digits_train):
    from mmguard.attack.augment import parse_augment

    def run(seed: int):
        adapter = copy.deepcopy(pristine)
        recipe = LVLMRecipe(model="lvlm-test", recipe="lora", lr=5e-3, epochs=2, batch_size=3,
                            seed=seed, augment=parse_augment("crop-flip,jpeg:80"))
        log = fine_tune_lvlm(adapter, digits_train, recipe)
        return log.step_losses, {n: p.detach().clone() for n, p in
                                 adapter.model.named_parameters() if ".lora_" in n}

    losses, weights = run(0)
    again, weights_again = run(0)
    assert losses == again
    assert all(torch.equal(weights[n], weights_again[n]) for n in weights)
    other, _ = run(1)
    assert other != losses


def test_seeds_scored_on_accuracy_alone_report_no_attention_shift(digits_train):
    # `mmguard demo --lvlm` and the lab skip the attention measurement (attention_examples=0).
    recipe = LVLMRecipe(model="lvlm-test", recipe="lora", lr=5e-3, epochs=1, batch_size=3)
    lines: list[str] = []
    for examples in (0, 2):
        result = run_lvlm_seeds(digits_train, digits_train.first(4), recipe, [0, 1], "clean",
                                AnswerEvaluation(max_new_tokens=2, attention_examples=examples,
                                                 samples=0), log=lines.append)
        assert ("tv_distance" in result["mean"]) == (examples > 0)
        assert set(result["mean"]) >= {"exact_match", "contains_match", "final_train_loss"}
        assert len(result["runs"]) == 2
    assert len(lines) == 4 and all(line.startswith("clean seed ") for line in lines)
    assert ["attention TV" in line for line in lines] == [False, False, True, True]


def test_mix_clean_triples_swaps_images_and_prompts_back(tmp_path):
    clean_dir, protected_dir = tmp_path / "clean", tmp_path / "protected"
    clean_manifest = export_dataset(load_builtin("digits", "train", "triples"), clean_dir,
                                    limit=6)
    protected_manifest = _fake_protected(clean_dir, protected_dir)
    protected_dataset, clean_dataset = read_dataset(protected_manifest), \
        read_dataset(clean_manifest)
    protected = load_triples(protected_dataset)
    assert all(turns[0].trigger == TRIGGER_TEXT and turns[0].trigger_position == "start"
               for turns in protected.turns)
    everything = mix_clean_triples(protected, protected_dataset, clean_dataset, 1.0, seed=0)
    assert all(turns[0].trigger is None for turns in everything.turns)
    assert all(torch.equal(a, b) for a, b in
               zip(everything.images, load_triples(clean_dataset).images, strict=True))
    half = mix_clean_triples(protected, protected_dataset, clean_dataset, 0.5, seed=0)
    assert sum(turns[0].trigger is None for turns in half.turns) == 3


# -- the command line -------------------------------------------------------------------

def _fake_protected(clean_dir: Path, out: Path) -> Path:
    """What `mmguard protect` leaves for triples: images (here copied), prompts with the
    trigger inserted at the start, and a run record naming each image's trigger."""
    shutil.copytree(clean_dir / "images", out / "images")
    clean = read_dataset(clean_dir / "manifest.csv")
    lines, items = ["image,prompt,response"], []
    for record in clean.records:
        lines.append(f"{record.image.key},{insert_trigger(record.prompt, TRIGGER_TEXT)},"
                     f"{record.response}")
        items.append(ReleasedItem(record.image.key, record.image.key, 0, float("inf"),
                                  TRIGGER_TEXT, "start"))
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    write_run_record(out, RunRecord(RecordedInput(str(clean_dir / "manifest.csv"), "csv",
                                                  "triples"), Budget(8 / 255, 8), items))
    return out / "manifest.csv"


def _mmguard(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_evaluate_cli_on_triples_reports_every_row(tmp_path):
    clean_dir = tmp_path / "clean"
    export_dataset(load_builtin("digits", "train", "triples"), clean_dir, limit=10)
    protected = _fake_protected(clean_dir, tmp_path / "protected")
    result = _mmguard("evaluate", "--train", str(protected), "--baseline-train",
                      str(clean_dir / "manifest.csv"), "--test", "digits:test",
                      "--attacker", "lvlm-test", "--recipe", "lora", "--epochs", "1",
                      "--lr", "5e-3", "--batch-size", "5", "--limit-test", "8",
                      "--max-new-tokens", "3", "--mix-clean",
                      f"{clean_dir / 'manifest.csv'}:0.2", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    for row in ("| untouched (zero-shot) |", "| fine-tuned on clean |",
                "| fine-tuned on given --train |", "| random guess", "| majority answer |"):
        assert row in result.stdout
    assert "degradation (1 - protected/clean)" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"zero_shot", "clean", "protected", "reference", "degradation", "attacker",
            "test"} <= set(report)
    assert report["test"] == {"images": 8, "examples": 8}
    assert report["attacker"]["recipe"] == "lora" and report["attacker"]["learning_rate"] == 5e-3
    for row in (report["zero_shot"], *report["clean"]["runs"], *report["protected"]["runs"]):
        assert 0.0 <= row["exact_match"] <= row["contains_match"] <= 100.0
        assert 0.0 <= row["tv_distance"] <= 1.0
        for side in ("train", "test"):
            assert sum(row["attention"][side].values()) == pytest.approx(1.0, abs=1e-4)
    protected_run = report["protected"]["runs"][0]
    assert protected_run["attention"]["train"]["trigger"] > 0.0  # trigger read from the record
    assert protected_run["attention"]["test"]["trigger"] == 0.0
    assert len(protected_run["loss_curve"]) == 1 and len(protected_run["step_losses"]) == 2
    assert protected_run["final_train_loss"] > 0
    level = report["reference"]
    assert 0 < level["random"] <= level["majority"] <= 100
    assert set(report["degradation"]) == {"exact_match", "contains_match"}


def test_evaluate_cli_rejects_data_that_does_not_fit_the_attacker(tmp_path):
    pairs = export_dataset(load_builtin("digits", "train", "pairs"), tmp_path / "pairs", limit=4)
    triples = export_dataset(load_builtin("digits", "train", "triples"), tmp_path / "triples",
                             limit=4)
    bad = _mmguard("evaluate", "--train", str(pairs), "--test", "digits:test",
                   "--attacker", "lvlm-test")
    assert bad.exit_code == 1 and "holds image-caption pairs" in bad.stderr
    assert "lvlm-test trains on (image, prompt, response) triples" in bad.stderr
    bad = _mmguard("evaluate", "--train", str(triples), "--test", "digits:test",
                   "--attacker", "rn-test")
    assert bad.exit_code == 1 and "holds (image, prompt, response) triples" in bad.stderr
    bad = _mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                   "--attacker", "rn-test", "--recipe", "lora")
    assert bad.exit_code == 1 and "--recipe lora is for LVLM attackers" in bad.stderr
    bad = _mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                   "--attacker", "lvlm-test", "--recipe", "scratch")
    assert bad.exit_code == 1 and "--recipe scratch is for contrastive" in bad.stderr
    bad = _mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                   "--attacker", "no-such-model")
    assert bad.exit_code == 1 and "unknown attacker 'no-such-model'" in bad.stderr


def test_each_step_uses_its_own_gradient_and_the_scheduled_rate(pristine, digits_train):
    """With lr 0 the weights stay put, so every step sees the same gradient: what is left in
    .grad after two steps must be one step's gradient, not the sum of both."""
    adapter = copy.deepcopy(pristine)
    recipe = LVLMRecipe(model="lvlm-test", recipe="projector", lr=0.0, epochs=2,
                        batch_size=len(digits_train.images), max_grad_norm=0.0)
    fine_tune_lvlm(adapter, digits_train, recipe)
    left = [p.grad.clone() for p in adapter.model.projector.parameters()]
    for parameter in adapter.model.projector.parameters():
        parameter.grad = None
        parameter.requires_grad_(True)
    images, examples = digits_train.inputs()
    adapter.loss(images, examples).loss.mean().backward()
    for kept, fresh in zip(left, adapter.model.projector.parameters(), strict=True):
        assert torch.allclose(kept, fresh.grad, rtol=1e-4, atol=1e-7)

    log = fine_tune_lvlm(copy.deepcopy(pristine), digits_train, LVLMRecipe(
        model="lvlm-test", recipe="projector", lr=1e-3, epochs=5, batch_size=2,
        warmup_fraction=0.2))
    rates = log.learning_rates
    assert len(rates) == 20 and rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False)) and rates[-1] < 1e-5


def test_evaluate_trains_the_attacker_from_the_given_projector(tmp_path):
    from safetensors.torch import save_file

    projector = tmp_path / "projector.safetensors"
    weights = create_embedded("lvlm-test", seed=7, aligned=False).projector_state()
    save_file(weights, str(projector))
    attacker = build_attacker(LVLMRecipe(model="lvlm-test", projector=str(projector)))
    assert all(torch.equal(attacker.projector_state()[name], value)
               for name, value in weights.items())
    assert not all(torch.equal(build_attacker(LVLMRecipe(model="lvlm-test"))
                               .projector_state()[name], value)
                   for name, value in weights.items())
    result = _mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                      "--attacker", "lvlm-test", "--projector", str(projector), "--epochs", "1",
                      "--batch-size", "4", "--limit-train", "4", "--limit-test", "4",
                      "--max-new-tokens", "2", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["attacker"]["projector"] == str(projector)


def test_answer_table_rows_degradation_and_reference_levels():
    def metrics(exact, tv, loss):
        return {"exact_match": exact, "contains_match": exact, "tv_distance": tv,
                "final_train_loss": loss}

    rows = {"zero-shot": {"exact_match": 10.0, "contains_match": 12.0, "tv_distance": 0.1},
            "clean": {"runs": [{}, {}], "mean": metrics(80.0, 0.2, 0.5),
                      "std": metrics(2.0, 0.01, 0.1)},
            "protected": {"runs": [{}], "mean": metrics(20.0, 0.3, 0.4),
                          "std": metrics(0.0, 0.0, 0.0)}}
    reference = {"random": 10.0, "majority": 30.0, "distinct_answers": 10}
    lines = answer_table(rows, reference, ("exact_match", "tv_distance"),
                         clean="clean").splitlines()
    assert lines == ["| attacker | exact match % | degradation | attention TV train↔test |",
                     "|---|---|---|---|",
                     "| zero-shot | 10.0 | | 0.100 |",
                     "| clean | 80.0 ± 2.0 | | 0.200 ± 0.010 |",
                     "| protected | 20.0 | 75% | 0.300 |",
                     "| random guess (1 of 10 answers) | 10.0 | | |",
                     "| majority answer | 30.0 | | |"]
    full = answer_table(rows, reference).splitlines()
    assert full[2] == "| zero-shot | 10.0 | 12.0 | 0.100 | – |"
