"""Answer accuracy of an LVLM on clean test triples, and how far its attention moved.

Protection of instruction data is judged by how badly an LVLM fine-tuned on it
answers clean test prompts (MMGuard, section 6): the greedy answer is scored
against the reference after VQA-style normalisation, by exact match and by
contains-match (the reference appears, as whole words, inside the answer;
chatty answers such as "It is a sneaker." still count). Accuracies are in
percent, like retrieval's R@K.

For closed answer sets (a class name per image) two reference levels say
what "learned nothing" looks like: guessing uniformly among the distinct test
answers, and always giving the most common one.

`attention_shift` measures the quantity MMGuard's Theorem 5.1 bounds: the
total-variation distance between where the attacker attends while producing
the answer (mass on image / prompt / trigger / template / answer keys, see
`models/lvlm/attention.py`) on its protected training inputs and on clean
test inputs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.attention import GROUP_NAMES, role_group_mass, total_variation
from mmguard.models.lvlm.base import LVLMAdapter, TextExample, answer_positions

ANSWER_METRICS = ("exact_match", "contains_match")
_ARTICLES = frozenset({"a", "an", "the"})
# As the VQA evaluation script does, so "two" and "2" are the same answer.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """Lowercase; drop apostrophes and thousands commas; other punctuation (except a decimal
    point) becomes a space; drop articles; number words to digits; single spaces."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_", " ", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised prediction as whole words
    (so "one" is not found in "none"); an empty reference needs an empty answer."""
    answer, wanted = normalize_answer(prediction), normalize_answer(reference)
    if not wanted:
        return not answer
    return f" {wanted} " in f" {answer} "


def answer_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"exact_match": %, "contains_match": %} over paired predictions and references."""
    if len(predictions) != len(references) or not references:
        raise MMGuardError(f"need one prediction per reference; got {len(predictions)} "
                           f"predictions and {len(references)} references")
    count = len(references)
    return {
        "exact_match": 100.0 * sum(map(exact_match, predictions, references)) / count,
        "contains_match": 100.0 * sum(map(contains_match, predictions, references)) / count,
    }


def reference_levels(references: Sequence[str]) -> dict[str, float]:
    """Accuracy (%) of a uniform guess among the distinct normalised answers and of always
    answering the most common one; meaningful for closed answer sets only."""
    if not references:
        raise MMGuardError("no reference answers")
    counts = Counter(normalize_answer(r) for r in references)
    return {"random": 100.0 / len(counts),
            "majority": 100.0 * counts.most_common(1)[0][1] / len(references),
            "distinct_answers": len(counts)}


def answer_degradation(clean: dict, protected: dict) -> dict[str, float | None]:
    """1 - protected/clean per metric (0.45 = 45% of clean accuracy lost; negative if
    protection helped); None when the clean accuracy is 0."""
    return {m: None if clean[m] == 0 else 1.0 - protected[m] / clean[m] for m in ANSWER_METRICS}


@torch.no_grad()
def generate_answers(adapter: LVLMAdapter, images: Sequence[torch.Tensor],
                     examples: Sequence[TextExample], batch_size: int = 16,
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to the examples' prompts, `batch_size` at a time."""
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        answers += adapter.generate(images[start:start + batch_size],
                                    examples[start:start + batch_size], max_new_tokens)
    return answers


@torch.no_grad()
def attention_distribution(adapter: LVLMAdapter, images: Sequence[torch.Tensor],
                           examples: Sequence[TextExample], batch_size: int = 16) -> torch.Tensor:
    """(5,) mean over examples of `role_group_mass` at the positions that produce the
    response (teacher-forced on the reference), the queries the binding losses use."""
    rows = []
    for start in range(0, len(examples), batch_size):
        pixels = adapter.pixel_inputs(images[start:start + batch_size])
        batch = adapter.encode(examples[start:start + batch_size], pixels)
        output = adapter.forward(batch, pixels, output_attentions=True)
        device = output.attention.device
        mass = role_group_mass(output.attention.float(), batch.roles.to(device),
                               answer_positions(batch.labels).to(device))
        rows.append(mass[mass.sum(dim=1) > 0].cpu())
    found = torch.cat(rows) if rows else torch.empty(0, len(GROUP_NAMES))
    if not len(found):
        raise MMGuardError("no example has response tokens to measure attention on")
    return found.mean(dim=0)


def attention_shift(adapter: LVLMAdapter,
                    train: tuple[Sequence[torch.Tensor], Sequence[TextExample]],
                    test: tuple[Sequence[torch.Tensor], Sequence[TextExample]],
                    batch_size: int = 16) -> dict:
    """TV distance between the answer tokens' attention on training and on test inputs,
    with both distributions ({group: share})."""
    on_train = attention_distribution(adapter, *train, batch_size)
    on_test = attention_distribution(adapter, *test, batch_size)
    return {"tv_distance": float(total_variation(on_train, on_test)),
            "attention": {"train": dict(zip(GROUP_NAMES, on_train.tolist(), strict=True)),
                          "test": dict(zip(GROUP_NAMES, on_test.tolist(), strict=True))}}
