"""Text an adaptive attacker cleans before training: stripping rare words.

A text trigger is a handful of words that the rest of the corpus does not use.
An attacker who suspects one can count, over the whole training set, how many
texts each word appears in and delete the words that appear in too few. This is
the spec's "stripping rare tokens" adaptive attack, at word level (what an
attacker reading the data would do, independent of any model's tokenizer).

The threshold is the attacker's choice, and the right one depends on the data:
- a whole number N >= 2: drop words found in fewer than N texts. N = 2 removes
  every word that occurs once, which catches per-item triggers;
- a fraction F in (0, 1): drop words found in fewer than F of the texts. For VQA
  data that asks the same question of every image, F = 0.5 leaves only the
  question's own words, which also removes triggers shared by a whole class.
The same rule hits clean text too, so every stripped protected row needs a
stripped clean row beside it (the benchmarks run both).

Words are whitespace-separated; they are compared lower-cased and without
leading or trailing punctuation ("this?" counts as "this"), and pure punctuation
is always kept. The kept words are joined by single spaces.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mmguard.data.trigger_text import insert_trigger
from mmguard.errors import MMGuardError

_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")


@dataclass(frozen=True)
class StripReport:
    """What stripping did to a corpus (logged and stored with results)."""

    texts: int
    texts_changed: int
    words: int
    words_removed: int

    def describe(self) -> str:
        return (f"stripped {self.words_removed} of {self.words} words; "
                f"{self.texts_changed} of {self.texts} texts changed")


def word_key(word: str) -> str:
    """The form a word is counted under: lower case, edge punctuation removed."""
    return _EDGE_PUNCTUATION.sub("", word.lower())


def parse_min_texts(text: str | float) -> float:
    """--strip-rare-words value: a whole number >= 2 or a fraction in (0, 1)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise MMGuardError(f"--strip-rare-words {text!r}: expected a whole number of texts "
                           "(at least 2) or a fraction of the texts in (0, 1)") from None
    if not math.isfinite(value) or value <= 0 or (value >= 1 and (value < 2
                                                                   or value != int(value))):
        raise MMGuardError(f"--strip-rare-words {text!r}: expected a whole number of texts "
                           "(at least 2) or a fraction of the texts in (0, 1)")
    return value


def strip_rare_words(texts: Sequence[str], min_texts: float) -> tuple[list[str], StripReport]:
    """Every text without the words that appear in fewer than `min_texts` of `texts`.

    `min_texts` is a count (>= 2) or, below 1, a fraction of len(texts).
    A word counts once per text, however often it repeats there.
    """
    min_texts = parse_min_texts(min_texts)
    needed = min_texts if min_texts >= 1 else min_texts * len(texts)
    counts = Counter(key for text in texts for key in {word_key(w) for w in text.split()})
    stripped, changed, words, removed = [], 0, 0, 0
    for text in texts:
        kept = [w for w in text.split() if not word_key(w) or counts[word_key(w)] >= needed]
        words += len(text.split())
        removed += len(text.split()) - len(kept)
        stripped.append(" ".join(kept))
        changed += stripped[-1] != text
    return stripped, StripReport(len(texts), changed, words, removed)


def strip_captions(captions: Sequence[Sequence[str]],
                   min_texts: float) -> tuple[list[list[str]], StripReport]:
    """Each image's captions, stripped with word counts over all captions of all images."""
    flat, report = strip_rare_words([c for group in captions for c in group], min_texts)
    out, start = [], 0
    for group in captions:
        out.append(flat[start:start + len(group)])
        start += len(group)
    return out, report


def strip_prompts(turns, min_texts: float):
    """Each image's examples with their released prompts stripped (counts over all prompts).

    `turns` is a TripleSet's list of TextExample lists. The trigger tag is
    dropped: after stripping, the attacker sees (and we encode) plain prompts.
    """
    prompts = [insert_trigger(e.prompt, e.trigger, e.trigger_position)
               for group in turns for e in group]
    flat, report = strip_rare_words(prompts, min_texts)
    out, position = [], iter(flat)
    for group in turns:
        out.append([replace(e, prompt=next(position), trigger=None, trigger_position="end")
                    for e in group])
    return out, report


def strip_training_set(data, min_texts: float):
    """An ImageCaptionSet (its captions) or a TripleSet (its prompts), stripped; and the report."""
    if data.kind == "pairs":
        captions, report = strip_captions(data.captions, min_texts)
        return replace(data, captions=captions), report
    if data.kind == "triples":
        turns, report = strip_prompts(data.turns, min_texts)
        return replace(data, turns=turns), report
    raise MMGuardError(f"cannot strip words from {data.kind} data")
