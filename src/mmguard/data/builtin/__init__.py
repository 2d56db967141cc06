"""Built-in real datasets with deterministic train/test splits.

Each is usable as pairs (image, caption) or as triples (image, prompt,
response), and is read from files that Debian or PyPI packages install; no
network is used. `load_builtin("emoji", "train", "pairs")` returns a Dataset
like any manifest would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmguard.data.builtin import (
    digits,
    emoji,
    emoji_captions,
    emoji_categories,
    emoji_groups,
    emoji_scenes,
    fashion_mnist,
)
from mmguard.data.builtin.common import BuiltinItem, build_dataset
from mmguard.data.records import Dataset, Kind
from mmguard.errors import MMGuardError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    description: str
    source: str  # where the data comes from, for `datasets list`
    prompt: str  # the question asked in the triples form
    items: Callable[[str], list[BuiltinItem]]


BUILTINS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec("emoji", emoji.DESCRIPTION, emoji.SOURCE, emoji.PROMPT, emoji.items),
        BuiltinSpec("emoji-captions", emoji_captions.DESCRIPTION, emoji_captions.SOURCE,
                    emoji_captions.PROMPT, emoji_captions.items),
        BuiltinSpec("emoji-categories", emoji_categories.DESCRIPTION, emoji_categories.SOURCE,
                    emoji_categories.PROMPT, emoji_categories.items),
        BuiltinSpec("emoji-groups", emoji_groups.DESCRIPTION, emoji_groups.SOURCE,
                    emoji_groups.PROMPT, emoji_groups.items),
        BuiltinSpec("emoji-scenes", emoji_scenes.DESCRIPTION, emoji_scenes.SOURCE,
                    emoji_scenes.PROMPT, emoji_scenes.items),
        BuiltinSpec("fashion-mnist", fashion_mnist.DESCRIPTION, fashion_mnist.SOURCE,
                    fashion_mnist.PROMPT, fashion_mnist.items),
        BuiltinSpec("digits", digits.DESCRIPTION, digits.SOURCE, digits.PROMPT, digits.items),
    )
}


def load_builtin(name: str, split: str = "train", kind: Kind = "pairs") -> Dataset:
    if name not in BUILTINS:
        raise MMGuardError(f"unknown dataset {name!r}; built-in datasets: {', '.join(BUILTINS)}")
    if split not in SPLITS:
        raise MMGuardError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    spec = BUILTINS[name]
    return build_dataset(name, split, kind, spec.items(split), spec.prompt)
