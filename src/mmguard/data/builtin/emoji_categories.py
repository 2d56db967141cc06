"""The emoji images labelled with their Unicode category: a harder closed-answer VQA set.

Same images and same train/test split as `emoji` (split by the emoji name), so
no glyph is on both sides and a test emoji is never seen in training: the
attacker must learn what a category looks like, not memorise glyphs.

The answer is a short phrase made from the emoji's emoji-test.txt subgroup:

- by default its words, lower-case, "-" read as a space and "&" as "and",
  with a leading head noun (face, animal, food, place, transport) moved to the
  end: "face-smiling" -> "smiling face", "food-prepared" -> "prepared food",
  "transport-air" -> "air transport", "sky & weather" -> "sky and weather",
  "musical-instrument" -> "musical instrument";
- `PHRASES` replaces that where the default reads badly ("animal-mammal" ->
  "mammal", "book-paper" -> "book or paper", "transport-sign" -> "transport
  sign") or would occur as whole words inside another answer, which the VQA
  contains-match would score as correct ("flag" -> "other flag" beside
  "country flag", "person" -> "people", "sport" -> "sports gear"); and it
  merges a few small subgroups into a sibling that reads the same: flowers
  into "plant", religious places into "building", the three subdivision flags
  into "country flag", maps with landscapes into "geography", single-finger
  hands into "hand sign", people resting into "person doing an activity",
  writing into "office item", sound into "sound and music", medical into
  "science and medicine".

A class is kept when it has at least `MIN_TRAIN` (5) training images and
`MIN_TEST` (1) test image; the others are dropped, not merged into their group
(a catch-all "other smiley" would name no visible property). With Debian's
emoji 15.0 list that keeps 73 classes, 1,409 training and 382 test images
(5-200 and 1-61 a class), and drops 79 emoji of 17 subgroups: face-tongue,
face-sleepy, face-hat, face-glasses, monkey-face, hand-prop,
animal-amphibian, transport-water, hotel, arts & crafts, money and currency
have no test emoji; person-symbol, food-marine, lock, gender and math have
fewer than 5 training emoji.

Classes are unbalanced (country flags are 14% of the training images), and
`--limit N` takes the first N images of a split, so each split is ordered
round-robin over the classes (each class's emoji in a fixed hashed order):
any prefix holds every class about equally until the small ones run out, and
its most common answer is rare. The triples form asks `PROMPT` and answers
with the phrase; the pairs caption is "an emoji of the category: <phrase>".
The manifest's `emoji_name` and `subgroup` columns say where each answer
comes from.
"""

from __future__ import annotations

import functools
from collections import Counter

from mmguard.data.builtin import emoji
from mmguard.data.builtin.common import BuiltinItem
from mmguard.errors import MMGuardError

DESCRIPTION = "the emoji images answered with their Unicode category, 73 classes (64x64 RGB)"
SOURCE = "Debian fonts-noto-color-emoji + unicode-data (emoji-test.txt subgroups)"
PROMPT = "Which category is this emoji from?"
CAPTION = "an emoji of the category: {}"
MIN_TRAIN, MIN_TEST = 5, 1
HEAD_NOUNS = ("face", "animal", "food", "place", "transport")

PHRASES = {
    # Smileys & Emotion
    "face-affection": "affectionate face",
    "face-hand": "face with hand",
    "face-neutral-skeptical": "neutral or skeptical face",
    # People & Body
    "hand-fingers-open": "open hand",
    "hand-fingers-partial": "hand sign",
    "hand-single-finger": "hand sign",
    "hand-fingers-closed": "closed hand",
    "body-parts": "body part",
    "person": "people",
    "person-gesture": "person gesturing",
    "person-role": "person in a role",
    "person-fantasy": "fantasy person",
    "person-activity": "person doing an activity",
    "person-resting": "person doing an activity",
    "person-sport": "person doing sport",
    # Animals & Nature
    "animal-mammal": "mammal",
    "animal-bird": "bird",
    "animal-amphibian": "amphibian",
    "animal-reptile": "reptile",
    "animal-bug": "bug",
    "plant-flower": "plant",
    "plant-other": "plant",
    # Food & Drink
    "food-fruit": "fruit",
    "food-vegetable": "vegetable",
    "food-marine": "seafood",
    "food-sweet": "dessert",
    # Travel & Places
    "place-map": "geography",
    "place-geographic": "geography",
    "place-building": "building",
    "place-religious": "building",
    # Activities
    "award-medal": "award",
    "sport": "sports gear",
    # Objects
    "sound": "sound and music",
    "music": "sound and music",
    "book-paper": "book or paper",
    "writing": "office item",
    "office": "office item",
    "science": "science and medicine",
    "medical": "science and medicine",
    # Symbols
    "av-symbol": "audio and video symbol",
    "alphanum": "alphanumeric",
    "geometric": "geometric shape",
    "transport-sign": "transport sign",
    # Flags
    "flag": "other flag",
    "country-flag": "country flag",
    "subdivision-flag": "country flag",
}


def default_phrase(subgroup: str) -> str:
    """The subgroup's words, head noun last: "face-smiling" -> "smiling face"."""
    words = subgroup.lower().replace("&", " and ").replace("-", " ").split()
    if len(words) > 1 and words[0] in HEAD_NOUNS:
        words = words[1:] + words[:1]
    return " ".join(words)


def phrase(subgroup: str) -> str:
    return PHRASES.get(subgroup) or default_phrase(subgroup)


@functools.lru_cache(maxsize=1)
def kept_classes() -> tuple[str, ...]:
    """The answers with enough images on both sides, in emoji-test.txt order."""
    counts = {split: Counter(phrase(entry.subgroup) for entry in emoji.all_emoji()
                             if emoji.in_split(entry, split))
              for split in ("train", "test")}
    answers = dict.fromkeys(phrase(entry.subgroup) for entry in emoji.all_emoji())
    kept = tuple(answer for answer in answers
                 if counts["train"][answer] >= MIN_TRAIN and counts["test"][answer] >= MIN_TEST)
    if not kept:
        raise MMGuardError(f"the emoji-categories dataset found no category with {MIN_TRAIN} "
                           f"training and {MIN_TEST} test emoji in {emoji.EMOJI_TEST}")
    return kept


def interleave(entries: list[emoji.EmojiEntry]) -> list[emoji.EmojiEntry]:
    """Round-robin over the classes in `kept_classes` order, each in hashed-name order."""
    return emoji.round_robin(entries, lambda entry: phrase(entry.subgroup), kept_classes())


def items(split: str) -> list[BuiltinItem]:
    emoji.check_sources("emoji-categories")
    kept = set(kept_classes())
    chosen = [entry for entry in emoji.all_emoji()
              if emoji.in_split(entry, split) and phrase(entry.subgroup) in kept]
    return [BuiltinItem(key=emoji.image_key(entry.symbol),
                        opener=functools.partial(emoji.render, entry.symbol),
                        captions=(CAPTION.format(phrase(entry.subgroup)),),
                        answer=phrase(entry.subgroup),
                        columns=(("emoji_name", entry.name), ("subgroup", entry.subgroup)))
            for entry in interleave(chosen)]
