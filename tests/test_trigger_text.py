"""Inserting a text trigger as whole words into a caption or prompt."""

from __future__ import annotations

import pytest

from mmguard.protect.trigger_text import insert_trigger

TEXT = "a cat sleeps on the mat"


@pytest.mark.parametrize(
    ("text", "trigger", "position", "expected"),
    [
        (TEXT, "zq7", "start", "zq7 a cat sleeps on the mat"),
        (TEXT, "zq7", "end", "a cat sleeps on the mat zq7"),
        (TEXT, "zq7", 0, "zq7 a cat sleeps on the mat"),
        (TEXT, "zq7", 1, "a zq7 cat sleeps on the mat"),
        (TEXT, "zq7", 3, "a cat sleeps zq7 on the mat"),
        (TEXT, "zq7", 6, "a cat sleeps on the mat zq7"),  # exactly the word count
        (TEXT, "zq7", 50, "a cat sleeps on the mat zq7"),  # beyond the end
        (TEXT, "two words", 2, "a cat two words sleeps on the mat"),
        ("Was ist das?", "tr1g", 2, "Was ist tr1g das?"),
        ("single", "zq7", 1, "single zq7"),
        ("single", "zq7", 0, "zq7 single"),
    ],
)
def test_insert_trigger_positions(text, trigger, position, expected):
    assert insert_trigger(text, trigger, position) == expected


@pytest.mark.parametrize("trigger", [None, ""])
@pytest.mark.parametrize("position", ["start", "end", 0, 3, 99])
def test_no_trigger_leaves_text_unchanged(trigger, position):
    assert insert_trigger(TEXT, trigger, position) == TEXT


def test_default_position_is_start():
    assert insert_trigger("hello world", "zq7") == "zq7 hello world"


@pytest.mark.parametrize(
    ("text", "position"),
    [
        (TEXT, "start"),
        (TEXT, "end"),
        (TEXT, 0),
        (TEXT, 4),
        (TEXT, 1000),
        ("Ein Hund, der läuft.", 2),
        ("emoji 😀 in text", 2),
        ("trailing punctuation!", 1),
    ],
)
def test_original_words_kept_in_order_and_trigger_whole(text, position):
    trigger = "zq7"
    result = insert_trigger(text, trigger, position)
    words = result.split()
    assert words.count(trigger) == 1  # inserted once, not glued to a neighbour
    words.remove(trigger)
    assert words == text.split()
    assert len(result) == len(text) + len(trigger) + 1


def test_word_index_counts_words_not_spaces():
    # Position 2 is after the second word; a doubled space between the words must not
    # count as an extra (empty) word.
    result = insert_trigger("a  b", "zq7", 2)
    assert result.split() == ["a", "b", "zq7"]
