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


def trigger_segments(text: str, trigger: str | None, position: str | int,
                     text_tag: int, trigger_tag: int) -> list[tuple[str, int]]:
    """`insert_trigger(text, trigger, position)` as tagged pieces.

    Joining the pieces gives exactly the inserted text; the separating space
    goes with the trigger when the trigger follows text (so a BPE tokeniser's
    leading-space tokens count as trigger tokens) and with the text otherwise.
    """
    if not trigger:
        return [(text, text_tag)]
    if not text:
        return [(trigger, trigger_tag)]
    words = list(re.finditer(r"\S+", text))
    index = 0 if position == "start" else len(words) if position == "end" else int(position)
    index = max(0, index)
    if index == 0:
        return [(trigger, trigger_tag), (" " + text, text_tag)]
    if index >= len(words):
        return [(text, text_tag), (" " + trigger, trigger_tag)]
    cut = words[index - 1].end()
    return [(text[:cut], text_tag), (" " + trigger, trigger_tag), (text[cut:], text_tag)]
