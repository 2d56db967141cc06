"""One emoji on a 512x512 canvas, answered with its Unicode group: real-size VQA.

For testing LVLM protection at real sizes (issue 12): the embedded LVLMs read
112-160 px, so these images are stored at 3-4.6x the model's side and the
model's resize averages every 3-5 stored pixels into one, as it would a photo.
The question has few answers, like Fashion-MNIST's ten, so that a protection
can be compared with the Fashion-MNIST rows: the nine groups of emoji-test.txt
("smileys and emotion", "people and body", "animals and nature", "food and
drink", "travel and places", "activities", "objects", "symbols", "flags").

Each image is one glyph of the `emoji` dataset (same train/test split, by the
emoji name, so no test glyph is seen in training), its long side drawn in
[MIN_SIDE, MAX_SIDE], at a random place over a plain or gradient pastel
background as in `emoji-scenes`; every choice comes from a generator seeded by
the emoji's name, so an image is the same in every build. Groups are unbalanced
(people and body is 17% of the training emoji), so each split is ordered
round-robin over the groups, each group's emoji in a fixed hashed order: any
`--limit N` prefix holds every group about equally (the first 240 training
images: 26-27 per group). The pairs caption is "an emoji from the group: <answer>".
"""

from __future__ import annotations

import functools
import random

from mmguard.data.builtin import emoji
from mmguard.data.builtin import emoji_scenes as scenes
from mmguard.data.builtin.common import BuiltinItem

DESCRIPTION = "one emoji on a 512x512 canvas answered with its Unicode group, 9 classes"
SOURCE = "Debian fonts-noto-color-emoji + unicode-data (emoji-test.txt groups)"
PROMPT = "Which group is this emoji from?"
CAPTION = "an emoji from the group: {}"
MIN_SIDE, MAX_SIDE = 192, 448  # 48-112 px at a 128-px model input


def answer(group: str) -> str:
    """"Smileys & Emotion" -> "smileys and emotion"."""
    return " ".join(group.lower().replace("&", " and ").split())


def plan_image(entry: emoji.EmojiEntry) -> scenes.Scene:
    """The emoji's canvas: its glyph's box and the background, seeded by its name."""
    rng = random.Random(f"emoji-groups/{entry.name}")
    side = rng.randint(MIN_SIDE, MAX_SIDE)
    glyph = scenes.Glyph(entry, rng.randint(0, scenes.SIZE - side),
                         rng.randint(0, scenes.SIZE - side), side)
    start = tuple(rng.randint(*scenes.PASTEL) for _ in range(3))
    end = start if rng.random() < 1 / 3 else tuple(rng.randint(*scenes.PASTEL)
                                                     for _ in range(3))
    background = scenes.Background(start, end, rng.choice(scenes.GRADIENTS))
    return scenes.Scene(emoji.image_key(entry.symbol), (glyph,), background)


def interleaved(split: str) -> list[emoji.EmojiEntry]:
    """The split's emoji round-robin over the groups (emoji-test.txt order), each group
    in hashed-name order."""
    groups = dict.fromkeys(entry.group for entry in emoji.all_emoji())
    return emoji.round_robin((entry for entry in emoji.all_emoji()
                              if emoji.in_split(entry, split)),
                             lambda entry: entry.group, groups)


def items(split: str) -> list[BuiltinItem]:
    emoji.check_sources("emoji-groups")
    found = []
    for entry in interleaved(split):
        plan = plan_image(entry)
        found.append(BuiltinItem(key=plan.key, opener=functools.partial(scenes.render, plan),
                                 captions=(CAPTION.format(answer(entry.group)),),
                                 answer=answer(entry.group),
                                 columns=(("emoji_name", entry.name),)))
    return found
