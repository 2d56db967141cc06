"""Putting a text trigger into a caption or prompt without touching its words."""

from __future__ import annotations

import re


def insert_trigger(text: str, trigger: str | None, position: str | int = "start") -> str:
    """Insert `trigger` as whole words at `position`: "start", "end" or a word index.

    Every original word is kept, in order; the trigger is never glued to a
    neighbouring word.
    """
    if not trigger:
        return text
    if not text:
        return trigger
    if position == "start":
        return f"{trigger} {text}"
    if position == "end":
        return f"{text} {trigger}"
    # Count words, not spaces, and leave the text's own spacing untouched.
    words = list(re.finditer(r"\S+", text))
    index = max(0, int(position))
    if index == 0:
        return f"{trigger} {text}"
    if index >= len(words):
        return f"{text} {trigger}"
    cut = words[index - 1].end()
    return f"{text[:cut]} {trigger}{text[cut:]}"
