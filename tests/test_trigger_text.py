"""A text trigger in a caption or prompt: inserting, locating, stripping, verifying."""

from __future__ import annotations

import pytest

from mmguard.data.trigger_text import (
    insert_trigger,
    is_original_plus_trigger,
    locate_trigger,
    strip_trigger,
    trigger_segments,
)

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


@pytest.mark.parametrize("position", ["start", "end", 0, 1, 3, 6, 50])
@pytest.mark.parametrize("trigger", ["zq7", "two words"])
def test_segments_join_to_the_inserted_text_with_the_trigger_tagged(trigger, position):
    pieces = trigger_segments(TEXT, trigger, position, 0, 1)
    assert "".join(piece for piece, _ in pieces) == insert_trigger(TEXT, trigger, position)
    tagged = [piece for piece, tag in pieces if tag == 1]
    assert len(tagged) == 1 and tagged[0].strip() == trigger
    assert trigger_segments(TEXT, None, position, 0, 1) == [(TEXT, 0)]


@pytest.mark.parametrize("text", [TEXT, "Was ist das?", "single", ""])
@pytest.mark.parametrize("position", ["start", "end", 0, 1, 2, 50])
def test_locate_and_strip_invert_insert(text, position):
    released = insert_trigger(text, "zq7", position)
    original, found = locate_trigger(released, "zq7")
    assert insert_trigger(original, "zq7", found) == released
    assert strip_trigger(released, "zq7") == original == text
    assert locate_trigger(released, "zq7", position) == (text, position)


def test_locate_prefers_the_recorded_position():
    # "a a" is "a" + trigger "a" at the start, at the end, or after word 1: only the
    # run record knows which.
    assert locate_trigger("a a", "a") == ("a", "start")
    assert locate_trigger("a a", "a", "end") == ("a", "end")
    # A recorded position that does not explain the text falls back to the search.
    assert locate_trigger("zq7 a cat", "zq7", "end") == ("a cat", "start")


def test_locate_and_strip_leave_text_the_trigger_cannot_explain():
    assert locate_trigger(TEXT, "zq7") is None
    assert locate_trigger("a catzq7 sleeps", "zq7") is None  # glued: never inserted so
    assert locate_trigger(TEXT, None) is None
    assert strip_trigger(TEXT, "zq7", "end") == TEXT


def test_inserted_trigger_is_the_only_change_a_text_may_have():
    assert is_original_plus_trigger("grinning face", "vivid athens grinning face",
                                    "vivid athens")
    assert is_original_plus_trigger("what is this?", "what is this? xx yy", "xx yy")
    assert is_original_plus_trigger("a cat", "a cat", None)
    assert not is_original_plus_trigger("grinning face", "vivid athens smiling face",
                                        "vivid athens")
    assert not is_original_plus_trigger("grinning face", "vivid grinning athens face",
                                        "vivid athens")
    assert not is_original_plus_trigger("a cat", "a cat extra", None)
