"""Emoji rendered from Debian's Noto Color Emoji font, named by Unicode's emoji-test.txt.

Every fully-qualified emoji in Unicode's list that the font draws as one
glyph: single code points, keycaps, flags and ZWJ sequences (families, people
with objects...). Skin-tone variants are left out, so no two images differ only
by a tone swatch. Captions are the official CLDR short names ("grinning face",
"flag: France", "family: man, woman, boy"). Images are 64x64 RGB on white.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from mmguard.data.builtin.common import BuiltinItem, split_of
from mmguard.errors import MMGuardError

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
DESCRIPTION = "~1,870 emoji with their Unicode names (64x64 RGB)"
SOURCE = "Debian fonts-noto-color-emoji + unicode-data"
PROMPT = "What does this emoji show?"
SIZE = 64
_FONT_SIZE = 109  # the only size the colour bitmap font carries
_CANVAS = 136


class EmojiEntry(NamedTuple):
    symbol: str  # the emoji string, e.g. "\U0001F600"
    name: str  # "grinning face"
    group: str  # "Smileys & Emotion"
    subgroup: str  # "face-smiling"


def parse_emoji_test(text: str) -> list[EmojiEntry]:
    """Fully-qualified, non-skin-tone, non-component emoji, with their group and subgroup."""
    found: list[EmojiEntry] = []
    group = subgroup = ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        if "; fully-qualified" not in line or group == "Component":
            continue
        codepoints, rest = line.split(";", 1)
        # "# 😀 E1.0 grinning face": drop the glyph and the version tag.
        name = rest.split("#", 1)[1].strip().split(" ", 2)[2]
        if "skin tone" in name:
            continue
        symbol = "".join(chr(int(cp, 16)) for cp in codepoints.split())
        found.append(EmojiEntry(symbol, name, group, subgroup))
    return found


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), _FONT_SIZE)


def draw(symbol: str, background: str = "white") -> Image.Image:
    """The glyph at the font's own size, centred on a square RGB canvas."""
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), background)
    font = _font()
    left, top, right, bottom = font.getbbox(symbol)
    origin = ((_CANVAS - (right - left)) // 2 - left, (_CANVAS - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(origin, symbol, font=font, embedded_color=True)
    return canvas


def render(symbol: str) -> Image.Image:
    return draw(symbol).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def check_sources(dataset: str = "emoji") -> None:
    """A clear error naming the Debian package when the font or the emoji list is missing."""
    for needed, package in ((FONT, "fonts-noto-color-emoji"), (EMOJI_TEST, "unicode-data")):
        if not needed.exists():
            raise MMGuardError(f"the {dataset} dataset needs {needed}: install the Debian "
                               f"package {package} (`make install` does)")


@functools.lru_cache(maxsize=1)
def all_emoji() -> tuple[EmojiEntry, ...]:
    """Every listed emoji the font draws as one glyph, in emoji-test.txt's order."""
    check_sources()
    font = _font()
    usable = []
    for entry in parse_emoji_test(EMOJI_TEST.read_text(encoding="utf-8")):
        left, _, right, _ = font.getbbox(entry.symbol)
        # A sequence the font cannot ligate is drawn as several glyphs side by side.
        if 0 < right - left <= _CANVAS:
            usable.append(entry)
    return tuple(usable)


def image_key(symbol: str) -> str:
    """"1f600.png": the code points in hex, joined by dashes."""
    return "-".join(f"{ord(ch):x}" for ch in symbol) + ".png"


def in_split(entry: EmojiEntry, split: str) -> bool:
    # By the name, so every caption set built on these images splits them alike.
    return split_of(entry.name) == split


def round_robin(entries: Iterable[EmojiEntry], class_of: Callable[[EmojiEntry], str],
                classes: Iterable[str]) -> list[EmojiEntry]:
    """`entries` taken one per class in turn (`classes` order), each class in a fixed
    hashed-name order: any prefix holds every class about equally until the small ones
    run out, so `--limit N` samples the classes evenly."""
    by_class: dict[str, list[EmojiEntry]] = {name: [] for name in classes}
    for entry in entries:
        by_class[class_of(entry)].append(entry)
    queues = [sorted(members, key=lambda entry: hashlib.sha256(entry.name.encode("utf-8"))
                     .digest()) for members in by_class.values()]
    return [entry for layer in itertools.zip_longest(*queues) for entry in layer
            if entry is not None]


def items(split: str) -> list[BuiltinItem]:
    return [BuiltinItem(key=image_key(entry.symbol), opener=functools.partial(render, entry.symbol),
                        captions=(entry.name,), answer=entry.name)
            for entry in all_emoji() if in_split(entry, split)]
