"""Putting a text trigger into a caption or prompt without touching its words."""

from __future__ import annotations


def insert_trigger(text: str, trigger: str | None, position: str | int = "start") -> str:
    """Insert `trigger` as whole words at `position`: "start", "end" or a word index.

    Every original word is kept, in order; the trigger is never glued to a
    neighbouring word.
    """
    if not trigger:
        return text
    if position == "start":
        return f"{trigger} {text}"
    if position == "end":
        return f"{text} {trigger}"
    words = text.split(" ")
    index = max(0, min(int(position), len(words)))
    return " ".join(words[:index] + [trigger] + words[index:])
