"""Scenes of 2-4 real emoji on a 512x512 canvas, captioned from the emoji names.

For testing protection at real sizes: photos are stored much larger than a
model's input, and the model's resize averages per-pixel noise away. These
images are 8x the side of the 64-px CPU-scale attackers, so every attacker
pixel is a blend of about 8x8 stored pixels.

Each scene draws 2-4 distinct emoji glyphs of the `emoji` dataset (Noto Color
Emoji, names from emoji-test.txt), each 128 px or more on its long side, at a
random place where its box shares at most 15% of the smaller box's area with
any earlier glyph's box, larger glyphs first, over a plain or two-colour
gradient pastel background. The caption names the glyphs left to right: "grinning face and
red apple and rocket". Train scenes use only train-split emoji and test scenes
only test-split emoji, so no test glyph is seen in training.

Every choice comes from a generator seeded by the split and the scene index,
so a scene is the same in every build (for the same font and emoji list), and
it is drawn only when it is read. The manifest's `emoji` column lists a
scene's glyphs by code points in caption order ("1f600 1f34e 1f680"): the
caption alone does not say where a name ends ("woman and man holding hands").
The triples form asks which emoji are in the picture and answers with the
caption.
"""

from __future__ import annotations

import functools
import math
import random
from typing import NamedTuple

import numpy as np
from PIL import Image

from mmguard.data.builtin import emoji
from mmguard.data.builtin.common import BuiltinItem

DESCRIPTION = "1,900 scenes of 2-4 emoji named left to right (512x512 RGB)"
SOURCE = "Debian fonts-noto-color-emoji + unicode-data (the emoji glyphs and split)"
PROMPT = "Which emoji are in this picture?"
SIZE = 512
SCENES = {"train": 1500, "test": 400}
MIN_GLYPHS, MAX_GLYPHS = 2, 4
MIN_SIDE = 128  # 16 px at a 64-px model input
MAX_OVERLAP = 0.15  # of the smaller of two glyph boxes
_TRIES = 100  # random places tried per glyph size before shrinking it
PASTEL = (170, 255)  # range of each background channel
GRADIENTS = ((1, 0), (0, 1), (1, 1), (1, -1))  # x and y weights: across, down, two diagonals


class Glyph(NamedTuple):
    entry: emoji.EmojiEntry
    left: int  # the glyph's square box on the canvas; the glyph is centred in it
    top: int
    side: int


class Background(NamedTuple):
    start: tuple[int, int, int]
    end: tuple[int, int, int]  # the same as start for a plain background
    direction: tuple[int, int]  # one of GRADIENTS


class Scene(NamedTuple):
    key: str  # "train-0042.png"
    glyphs: tuple[Glyph, ...]  # in drawing order
    background: Background

    def left_to_right(self) -> list[Glyph]:
        return sorted(self.glyphs, key=lambda glyph: (2 * glyph.left + glyph.side,
                                                      2 * glyph.top + glyph.side))

    @property
    def caption(self) -> str:
        return " and ".join(glyph.entry.name for glyph in self.left_to_right())

    @property
    def codes(self) -> str:
        """The glyphs' code points in caption order: "1f600 1f34e 1f680"."""
        return " ".join(emoji.image_key(glyph.entry.symbol).removesuffix(".png")
                        for glyph in self.left_to_right())


def overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    """Shared area of two square boxes (left, top, side)."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0)


def _place(rng: random.Random, side: int,
           placed: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """A box overlapping every placed box by at most MAX_OVERLAP of the smaller one.

    A glyph that finds no place shrinks by a tenth; at MIN_SIDE it takes the
    least-overlapping place tried, so a crowded scene still gets all its glyphs.
    """
    while True:
        best, best_excess = None, math.inf
        for _ in range(_TRIES):
            box = (rng.randint(0, SIZE - side), rng.randint(0, SIZE - side), side)
            excess = max((overlap(box, other) - MAX_OVERLAP * min(side, other[2]) ** 2
                          for other in placed), default=0.0)
            if excess <= 0:
                return box
            if excess < best_excess:
                best, best_excess = box, excess
        if side == MIN_SIDE:
            return best
        side = max(MIN_SIDE, int(side * 0.9))


def plan_scene(split: str, index: int, pool: list[emoji.EmojiEntry]) -> Scene:
    """Scene `index` of `split` with glyphs from `pool`, from its own seeded generator."""
    rng = random.Random(f"emoji-scenes/{split}/{index}")
    count = rng.randint(MIN_GLYPHS, MAX_GLYPHS)
    entries = rng.sample(pool, count)
    # The largest glyphs fit side by side: about 325 px for two, 230 px for four.
    largest = int(0.9 * SIZE / math.sqrt(count))
    sides = sorted((rng.randint(MIN_SIDE, largest) for _ in entries), reverse=True)
    boxes: list[tuple[int, int, int]] = []
    for side in sides:
        boxes.append(_place(rng, side, boxes))
    start = tuple(rng.randint(*PASTEL) for _ in range(3))
    plain = rng.random() < 1 / 3
    end = start if plain else tuple(rng.randint(*PASTEL) for _ in range(3))
    background = Background(start, end, rng.choice(GRADIENTS))
    glyphs = tuple(Glyph(entry, *box) for entry, box in zip(entries, boxes, strict=True))
    return Scene(f"{split}-{index:04d}.png", glyphs, background)


@functools.lru_cache(maxsize=2)
def scenes(split: str) -> tuple[Scene, ...]:
    pool = [entry for entry in emoji.all_emoji() if emoji.in_split(entry, split)]
    return tuple(plan_scene(split, index, pool) for index in range(SCENES[split]))


def background_pixels(background: Background) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a linear blend from start to end along the direction."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    along = background.direction[0] * x + background.direction[1] * y
    fraction = (along - along.min()) / (along.max() - along.min())
    start, end = np.array(background.start, float), np.array(background.end, float)
    return np.round(start + (end - start) * fraction[..., None]).astype(np.uint8)


def glyph_image(symbol: str) -> Image.Image:
    """The emoji's colour glyph at the font's size, RGBA, cropped to its visible pixels."""
    on_black = np.asarray(emoji.draw(symbol, "black"), dtype=np.int16)
    on_white = np.asarray(emoji.draw(symbol, "white"), dtype=np.int16)
    # Over black a pixel shows its colour times its alpha; white minus black is 255 - alpha.
    alpha = 255 - (on_white - on_black).max(axis=2)
    premultiplied = np.dstack([on_black, alpha]).astype(np.uint8)
    height, width = alpha.shape
    image = Image.frombytes("RGBa", (width, height), premultiplied.tobytes()).convert("RGBA")
    return image.crop(image.getbbox())


def placed_glyph(glyph: Glyph) -> tuple[Image.Image, tuple[int, int]]:
    """The glyph scaled so its long side fills its box, and its top-left corner on the canvas."""
    image = glyph_image(glyph.entry.symbol)
    scale = glyph.side / max(image.size)
    width, height = (max(1, round(length * scale)) for length in image.size)
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image, (glyph.left + (glyph.side - width) // 2, glyph.top + (glyph.side - height) // 2)


def render(scene: Scene) -> Image.Image:
    canvas = Image.fromarray(background_pixels(scene.background)).convert("RGBA")
    for glyph in scene.glyphs:
        image, corner = placed_glyph(glyph)
        canvas.alpha_composite(image, corner)
    return canvas.convert("RGB")


def items(split: str) -> list[BuiltinItem]:
    emoji.check_sources("emoji-scenes")
    return [BuiltinItem(key=scene.key, opener=functools.partial(render, scene),
                        captions=(scene.caption,), answer=scene.caption,
                        columns=(("emoji", scene.codes),))
            for scene in scenes(split)]
