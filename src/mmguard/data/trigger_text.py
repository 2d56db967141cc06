"""A text trigger in a caption or prompt: insert it, find it again, take it out, check it.

A trigger goes in as whole words at a position ("start", "end" or a word
index) and never touches the text's own words. Everything here is defined by
`insert_trigger`: a trigger is located in a released text by finding the
original and position that `insert_trigger` turns into exactly that text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

Position = str | int  # "start", "end" or a word index


def insert_trigger(text: str, trigger: str | None, position: Position = "start") -> str:
    """Insert `trigger` as whole words at `position`: "start", "end" or a word index.

    Every original word is kept, in order; the trigger is never glued to a
    neighbouring word.
    """
    return "".join(piece for piece, _ in trigger_segments(text, trigger, position, 0, 1))


def trigger_segments(text: str, trigger: str | None, position: Position,
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
    # Count words, not spaces, and leave the text's own spacing untouched.
    words = list(re.finditer(r"\S+", text))
    index = 0 if position == "start" else len(words) if position == "end" else int(position)
    index = max(0, index)
    if index == 0:
        return [(trigger, trigger_tag), (" " + text, text_tag)]
    if index >= len(words):
        return [(text, text_tag), (" " + trigger, trigger_tag)]
    cut = words[index - 1].end()
    return [(text[:cut], text_tag), (" " + trigger, trigger_tag), (text[cut:], text_tag)]


def locate_trigger(text: str, trigger: str | None,
                   position: Position | None = None) -> tuple[str, Position] | None:
    """(original, position) with `insert_trigger(original, trigger, position) == text`.

    The recorded `position`, when given, is tried first; otherwise (or when it
    does not explain the text) every place the trigger occurs is tried in
    order. None when the trigger cannot explain the text.
    """
    if not trigger:
        return None
    candidates = list(_trigger_candidates(text, trigger))
    if position is not None:
        for original, _ in candidates:
            if insert_trigger(original, trigger, position) == text:
                return original, position
    for original, found in candidates:
        if insert_trigger(original, trigger, found) == text:
            return original, found
    return None


def _trigger_candidates(text: str, trigger: str) -> Iterator[tuple[str, Position]]:
    """Every (original, position) an occurrence of `trigger` in `text` suggests."""
    if text == trigger:
        yield "", "start"
        return
    for match in re.finditer(re.escape(trigger), text):
        start, end = match.span()
        before, after = text[:start], text[end:]
        if start == 0 and after.startswith(" "):
            yield after[1:], "start"
        elif before.endswith(" "):
            original = before[:-1] + after
            yield original, "end"
            yield original, len(before.split())


def strip_trigger(text: str, trigger: str | None, position: Position | None = None) -> str:
    """`text` without the trigger `insert_trigger` put in; unchanged when it cannot be located."""
    located = locate_trigger(text, trigger, position)
    return text if located is None else located[0]


def is_original_plus_trigger(original: str, text: str, trigger: str | None) -> bool:
    """Is `text` the words of `original` with `trigger`'s words inserted once, in one run?

    Compares words, not spacing: what a release check needs is that no word
    was changed, lost or added besides the trigger.
    """
    words, added = text.split(), (trigger or "").split()
    if not added:
        return words == original.split()
    return any(words[i:i + len(added)] == added
               and words[:i] + words[i + len(added):] == original.split()
               for i in range(len(words) - len(added) + 1))
