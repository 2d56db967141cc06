"""Instruction triples as an LVLM attacker sees them: decoded images and text examples.

A protected folder's manifest already holds the prompts with their triggers
inserted, and that text is what an attacker trains on. For measuring where
attention goes, though, we want to know which tokens are the trigger. The
run record `mmguard protect` writes beside the manifest names each image's
trigger and where it went, so `load_triples` splits it back out of the
prompt: the example then encodes to the very same text and tokens, only with
the trigger's tokens tagged TRIGGER instead of PROMPT. Without a run record
the prompts are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mmguard.data.images import load_image_uint8, to_float
from mmguard.data.records import Dataset, Kind, TripleRecord
from mmguard.data.release import has_run_record, read_run_record
from mmguard.data.trigger_text import Position, locate_trigger
from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import TextExample


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
        trigger, position = triggers.get(key, (None, None))
        turns.append([split_trigger(r.prompt, r.response, trigger, position) for r in records])
        keys.append(key)
    if not images:
        raise MMGuardError(f"{dataset.source} has no triples")
    return TripleSet(images, turns, keys)


def released_triggers(dataset: Dataset) -> dict[str, tuple[str, Position | None]]:
    """Image key in a protected folder's manifest -> (trigger, position) put into its prompts.

    Empty for data without a run record beside it (not a protected folder).
    """
    if dataset.root is None or not has_run_record(Path(dataset.root)):
        return {}
    return read_run_record(Path(dataset.root)).triggers_by_file()


def split_trigger(prompt: str, response: str, trigger: str | None,
                  position: Position | None = None) -> TextExample:
    """The example whose encoding is `prompt`, with `trigger` tagged where it was inserted.

    `position` is where the run record says the trigger went; without it every
    place `insert_trigger` could have put it is tried. A prompt the trigger
    cannot explain stays whole.
    """
    located = locate_trigger(prompt, trigger, position)
    if located is None:
        return TextExample(prompt, response)
    original, found = located
    return TextExample(original, response, trigger, found)
