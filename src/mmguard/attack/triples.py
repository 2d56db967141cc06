"""Instruction triples as an LVLM attacker sees them: decoded images and text examples.

A protected folder's manifest already holds the prompts with their triggers
inserted, and that text is what an attacker trains on. For measuring where
attention goes, though, we want to know which tokens are the trigger. The
run record `mmguard protect` writes beside the manifest names each image's
trigger, so `load_triples` splits it back out of the prompt: the example then
encodes to the very same text and tokens, only with the trigger's tokens
tagged TRIGGER instead of PROMPT. Without a run record the prompts are used
as they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mmguard.data.images import load_image_uint8, to_float
from mmguard.data.records import Dataset, Kind, TripleRecord
from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import TextExample
from mmguard.protect.output import RUN_RECORD
from mmguard.protect.trigger_text import insert_trigger


@dataclass
class TripleSet:
    """Decoded images (stored size, [0, 1]) and, per image, its (prompt, response) examples."""

    kind: ClassVar[Kind] = "triples"
    images: list[torch.Tensor]
    turns: list[list[TextExample]]
    keys: list[str] = field(default_factory=list)

    def examples(self) -> list[tuple[int, TextExample]]:
        """Every example with the index of its image, in image order."""
        return [(index, example) for index, turns in enumerate(self.turns) for example in turns]

    def inputs(self) -> tuple[list[torch.Tensor], list[TextExample]]:
        """One image per example (shared tensors, not copies) and the examples."""
        pairs = self.examples()
        return [self.images[i] for i, _ in pairs], [example for _, example in pairs]

    def first(self, count: int | None) -> TripleSet:
        """The first `count` images with their examples (all when None)."""
        return TripleSet(self.images[:count], self.turns[:count], self.keys[:count])


def load_triples(dataset: Dataset, limit: int | None = None) -> TripleSet:
    """Decode the first `limit` images (all when None) and their triples."""
    if dataset.kind != "triples":
        raise MMGuardError(f"{dataset.source} holds image-caption {dataset.kind}; an LVLM "
                           "attacker needs (image, prompt, response) triples")
    triggers = released_triggers(dataset)
    images, turns, keys = [], [], []
    for key, indices in list(dataset.records_by_image().items())[:limit]:
        records = [dataset.records[i] for i in indices]
        assert all(isinstance(r, TripleRecord) for r in records)
        images.append(to_float(load_image_uint8(records[0].image, records[0].where)))
        turns.append([split_trigger(r.prompt, r.response, triggers.get(key)) for r in records])
        keys.append(key)
    if not images:
        raise MMGuardError(f"{dataset.source} has no triples")
    return TripleSet(images, turns, keys)


def released_triggers(dataset: Dataset) -> dict[str, str]:
    """Image key in a protected folder's manifest -> the trigger put into its prompts."""
    if dataset.root is None:
        return {}
    record_path = Path(dataset.root) / RUN_RECORD
    if not record_path.exists():
        return {}
    try:
        items = json.loads(record_path.read_text(encoding="utf-8")).get("items", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}
    return {item["file"]: item["trigger"] for item in items
            if isinstance(item, dict) and item.get("file") and item.get("trigger")}


def split_trigger(prompt: str, response: str, trigger: str | None) -> TextExample:
    """The example whose encoding is `prompt`, with `trigger` tagged where it was inserted.

    Tries every place `insert_trigger` could have put it and keeps the one that
    rebuilds `prompt` exactly; a prompt the trigger cannot explain stays whole.
    """
    if trigger:
        if prompt == trigger:
            return TextExample("", response, trigger, "start")
        for match in re.finditer(re.escape(trigger), prompt):
            start, end = match.span()
            before, after = prompt[:start], prompt[end:]
            if start == 0 and after.startswith(" "):
                candidates = [(after[1:], "start")]
            elif before.endswith(" "):
                original = before[:-1] + after
                candidates = [(original, "end"), (original, len(before.split()))]
            else:
                continue
            for original, position in candidates:
                if insert_trigger(original, trigger, position) == prompt:
                    return TextExample(original, response, trigger, position)
    return TextExample(prompt, response)
