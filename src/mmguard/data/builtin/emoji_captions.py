"""The emoji images with several captions each, from independent real sources.

Same images and same train/test split as `emoji` (split by image); every image
gets 2-5 captions, one manifest row each, the image repeated, so an image is
no longer its caption's unique key (as in COCO or Flickr30k):

1. its emoji-test.txt name ("grinning face");
2. its Unicode character name, for single code points ("smiling face with
   open mouth" for 😃, whose emoji name is "grinning face with big eyes");
3. its CLDR short name ("tts"), from Debian's unicode-cldr-core;
4. its CLDR keywords as one phrase ("face, grin, grinning face");
5. its emoji-test group and subgroup ("smileys emotion, face smiling"),
   shared by every emoji of the subgroup.

Captions are deduplicated case-insensitively in that order. The triples form
answers with the emoji-test name, like `emoji`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple

from mmguard.data.builtin import emoji
from mmguard.data.builtin.common import BuiltinItem
from mmguard.errors import MMGuardError

# CLDR's English annotations, and the derived ones that cover sequences (flags,
# keycaps, ZWJ families); both come with the package.
CLDR_PACKAGE = "unicode-cldr-core"
CLDR_ANNOTATIONS = (Path("/usr/share/unicode/cldr/common/annotations/en.xml"),
                    Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml"))
DESCRIPTION = "the emoji images with 2-4 captions each: names, CLDR keywords, group (64x64 RGB)"
SOURCE = "Debian fonts-noto-color-emoji + unicode-data + unicode-cldr-core, Python unicodedata"
PROMPT = emoji.PROMPT
MIN_CAPTIONS, MAX_CAPTIONS = 2, 5
_VARIATION_SELECTOR = "\ufe0f"  # CLDR lists every emoji without it


class Annotation(NamedTuple):
    short_name: str | None  # CLDR's "tts" name, "grinning face"
    keywords: tuple[str, ...]  # ("face", "grin", "grinning face")


def parse_cldr_annotations(xml_text: str) -> dict[str, Annotation]:
    """Emoji string (without U+FE0F) -> its CLDR short name and keywords."""
    short_names: dict[str, str] = {}
    keywords: dict[str, tuple[str, ...]] = {}
    for node in ElementTree.fromstring(xml_text).iter("annotation"):
        symbol, text = node.get("cp"), (node.text or "").strip()
        if not symbol or not text:
            continue
        if node.get("type") == "tts":
            short_names[symbol] = text
        else:
            keywords[symbol] = tuple(word.strip() for word in text.split("|") if word.strip())
    return {symbol: Annotation(short_names.get(symbol), keywords.get(symbol, ()))
            for symbol in short_names.keys() | keywords.keys()}


@functools.lru_cache(maxsize=1)
def _cldr() -> dict[str, Annotation]:
    missing = [path for path in CLDR_ANNOTATIONS if not path.exists()]
    if missing:
        raise MMGuardError(f"the emoji-captions dataset needs {missing[0]}: install the Debian "
                           f"package {CLDR_PACKAGE} (`make install` does)")
    merged: dict[str, Annotation] = {}
    for path in CLDR_ANNOTATIONS:
        merged.update(parse_cldr_annotations(path.read_text(encoding="utf-8")))
    return merged


def group_phrase(group: str, subgroup: str) -> str:
    """"Smileys & Emotion", "face-smiling" -> "smileys emotion, face smiling"."""
    def words(text: str) -> str:
        return " ".join(re.sub(r"[&\-]", " ", text.lower()).split())

    return f"{words(group)}, {words(subgroup)}"


def character_name(symbol: str) -> str | None:
    """Unicode's name of a single-code-point emoji, lower-cased; None for sequences and
    for characters newer than Python's Unicode database."""
    bare = symbol.replace(_VARIATION_SELECTOR, "")
    if len(bare) != 1:
        return None
    return unicodedata.name(bare, "").lower() or None


def captions_of(entry: emoji.EmojiEntry, cldr: dict[str, Annotation]) -> tuple[str, ...]:
    """The entry's distinct captions (case-insensitive), in the sources' order, at most 5."""
    annotation = cldr.get(entry.symbol.replace(_VARIATION_SELECTOR, ""), Annotation(None, ()))
    candidates = [entry.name, character_name(entry.symbol), annotation.short_name,
                  ", ".join(annotation.keywords) or None,
                  group_phrase(entry.group, entry.subgroup)]
    distinct: dict[str, str] = {}
    for caption in candidates:
        if caption:
            distinct.setdefault(caption.casefold(), caption)
    return tuple(distinct.values())[:MAX_CAPTIONS]


def items(split: str) -> list[BuiltinItem]:
    cldr = _cldr()
    chosen = []
    for entry in emoji.all_emoji():
        captions = captions_of(entry, cldr)
        if not emoji.in_split(entry, split) or len(captions) < MIN_CAPTIONS:
            continue
        chosen.append(BuiltinItem(key=emoji.image_key(entry.symbol),
                                  opener=functools.partial(emoji.render, entry.symbol),
                                  captions=captions, answer=entry.name))
    return chosen
