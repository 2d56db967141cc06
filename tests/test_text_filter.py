"""The adaptive attacker's rare-word stripping (mmguard.attack.text_filter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmguard.attack.contrastive import ImageCaptionSet
from mmguard.attack.text_filter import (
    parse_min_texts,
    strip_captions,
    strip_rare_words,
    strip_training_set,
)
from mmguard.attack.triples import TripleSet
from mmguard.data.trigger_text import insert_trigger
from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import TextExample
from tests.conftest import cli_env

QUESTION = "What kind of clothing is this?"


def test_count_two_removes_words_that_occur_once_and_keeps_shared_ones():
    texts = ["a red apple qzx", "a green apple", "red car vbn mlk", "a car"]
    stripped, report = strip_rare_words(texts, 2)
    assert stripped == ["a red apple", "a apple", "red car", "a car"]
    assert (report.texts, report.texts_changed, report.words, report.words_removed) == \
        (4, 3, 13, 4)
    assert report.describe() == "stripped 4 of 13 words; 3 of 4 texts changed"


def test_words_count_once_per_text_case_and_edge_punctuation_ignored():
    # "Dog" twice in one text is still one text; "dog." in another makes two.
    stripped, _ = strip_rare_words(["Dog dog bites", "the dog.", "bites ?"], 2)
    assert stripped == ["Dog dog bites", "dog.", "bites ?"]
    stripped, _ = strip_rare_words(["Dog dog", "cat"], 2)
    assert stripped == ["", ""]


def test_fraction_keeps_the_shared_question_and_removes_class_shared_triggers():
    triggers = ["pancreatitis ankle boot"] * 3 + ["if error the"] * 3 + [""] * 4
    prompts = [insert_trigger(QUESTION, t, "end") for t in triggers]
    # Each trigger repeats in 3 of 10 prompts: a count of 2 keeps it, half the prompts does not.
    assert strip_rare_words(prompts, 2)[0] == prompts
    stripped, report = strip_rare_words(prompts, 0.5)
    assert stripped == [QUESTION] * 10 and report.words_removed == 18


@pytest.mark.parametrize("bad", ["1", "0", "1.5", "-2", "abc", "nan", "inf", "2.5"])
def test_thresholds_outside_the_contract_are_refused_naming_the_value(bad):
    with pytest.raises(MMGuardError, match=f"--strip-rare-words '{bad}'"):
        parse_min_texts(bad)


def test_valid_thresholds_parse():
    assert parse_min_texts("2") == 2 and parse_min_texts("0.5") == 0.5
    assert parse_min_texts("10") == 10


def test_captions_keep_their_grouping_and_count_over_all_images():
    captions, report = strip_captions([["a cat xq", "a cat"], ["a dog"], ["dog cat zz"]], 2)
    assert captions == [["a cat", "a cat"], ["a dog"], ["dog cat"]]
    assert report.texts == 4 and report.words_removed == 2


def test_triples_lose_their_triggers_and_trigger_tags():
    examples = [[TextExample(QUESTION, "shirt", f"tok{i} word{i}", "end")] for i in range(4)]
    examples.append([TextExample(QUESTION, "bag")])
    data = TripleSet(images=[None] * 5, turns=examples, keys=[f"k{i}" for i in range(5)])
    stripped, report = strip_training_set(data, 2)
    assert [t[0].prompt for t in stripped.turns] == [QUESTION] * 5
    assert all(t[0].trigger is None for t in stripped.turns)
    assert [t[0].response for t in stripped.turns] == ["shirt"] * 4 + ["bag"]
    assert stripped.keys == data.keys and report.words_removed == 8
    assert data.turns[0][0].trigger == "tok0 word0"  # the input is not modified


def test_pairs_keep_images_and_keys():
    data = ImageCaptionSet(images=["i0", "i1"], captions=[["red bus"], ["red xx"]],
                           keys=["a", "b"])
    stripped, _ = strip_training_set(data, 2)
    assert stripped.captions == [["red"], ["red"]]
    assert stripped.images == data.images and stripped.keys == data.keys


def test_evaluate_cli_strips_the_training_captions(tmp_path):
    subprocess.run([sys.executable, "-m", "mmguard", "datasets", "export", "digits", "--out",
                    str(tmp_path / "c"), "--limit", "24"], check=True, env=cli_env(),
                   capture_output=True)
    manifest = tmp_path / "c" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    # Give every caption its own made-up trigger word, as MEM does.
    header, rows = lines[0], lines[1:]
    assert header.split(",")[:2] == ["image", "caption"]
    rows = [f"{row.split(',', 1)[0]},zq{i}x {row.split(',', 1)[1]}"
            for i, row in enumerate(rows)]
    manifest.write_text("\n".join([header, *rows]) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "mmguard", "evaluate", "--train", str(manifest), "--test",
         "digits:test", "--attacker", "rn-test", "--epochs", "1", "--strip-rare-words", "2",
         "--json", str(tmp_path / "r.json")], capture_output=True, text=True, env=cli_env(),
        timeout=300)
    assert result.returncode == 0, result.stderr
    # Every made-up word goes, and so does any digits word that occurs in one caption only.
    stripped, report = strip_rare_words([row.split(",", 1)[1] for row in rows], 2)
    assert not any("zq" in caption for caption in stripped) and report.words_removed >= 24
    assert f"{manifest}: {report.describe()}" in result.stderr
    assert "24 of 24 texts changed" in result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["strip_rare_words"] == "2"
    bad = subprocess.run([sys.executable, "-m", "mmguard", "evaluate", "--train",
                          str(manifest), "--test", "digits:test", "--strip-rare-words", "1"],
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert bad.returncode == 1 and "--strip-rare-words '1'" in bad.stderr
