"""Built-in datasets (emoji, emoji-scenes, digits, fashion-mnist) and exporting them to files."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmguard.cli import main
from mmguard.data.builtin import BUILTINS, load_builtin
from mmguard.data.builtin import digits as digits_module
from mmguard.data.builtin import emoji as emoji_module
from mmguard.data.builtin import emoji_captions as captions_module
from mmguard.data.builtin import emoji_categories as categories_module
from mmguard.data.builtin import emoji_groups as groups_module
from mmguard.data.builtin import emoji_scenes as scenes_module
from mmguard.data.builtin import fashion_mnist as fashion_module
from mmguard.data.builtin.emoji import EmojiEntry, parse_emoji_test
from mmguard.data.builtin.emoji_captions import Annotation, captions_of, parse_cldr_annotations
from mmguard.data.export import export_dataset
from mmguard.data.images import load_image_uint8, open_pil, to_float
from mmguard.data.records import PairRecord, TripleRecord
from mmguard.data.sources import read_dataset
from mmguard.errors import MMGuardError

needs_emoji = pytest.mark.skipif(
    not (emoji_module.FONT.exists() and emoji_module.EMOJI_TEST.exists()),
    reason="emoji font or emoji-test.txt not installed")
needs_cldr = pytest.mark.skipif(
    not all(path.exists() for path in captions_module.CLDR_ANNOTATIONS),
    reason="unicode-cldr-core not installed")
needs_fashion = pytest.mark.skipif(
    not (fashion_module.ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed")

SMALL = [pytest.param("emoji", marks=needs_emoji), pytest.param("emoji-scenes", marks=needs_emoji),
         pytest.param("emoji-categories", marks=needs_emoji),
         pytest.param("emoji-groups", marks=needs_emoji), "digits"]


def keys(dataset) -> list[str]:
    return [record.image.key for record in dataset.records]


def image(record) -> torch.Tensor:
    return load_image_uint8(record.image, record.where)


# --- shared properties -----------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_splits_disjoint_and_deterministic(name: str):
    train = load_builtin(name, "train", "pairs")
    test = load_builtin(name, "test", "pairs")

    assert len(train.records) > len(test.records) > 0
    assert not set(keys(train)) & set(keys(test))
    assert len(set(keys(train))) == len(train.records)
    assert len(set(keys(test))) == len(test.records)
    assert keys(load_builtin(name, "train", "pairs")) == keys(train)
    assert keys(load_builtin(name, "test", "pairs")) == keys(test)
    assert train.source == f"builtin:{name}/train"
    assert train.kind == "pairs"
    assert train.images()[0].path is None  # in-memory images


@pytest.mark.parametrize("name", SMALL)
def test_pairs_and_triples_share_images(name: str):
    pairs = load_builtin(name, "test", "pairs")
    triples = load_builtin(name, "test", "triples")
    prompt = BUILTINS[name].prompt

    assert triples.kind == "triples"
    assert keys(pairs) == keys(triples)
    assert all(isinstance(record, PairRecord) for record in pairs.records)
    assert all(isinstance(record, TripleRecord) for record in triples.records)
    assert all(record.prompt == prompt for record in triples.records)
    for pair, triple in list(zip(pairs.records, triples.records, strict=True))[:5]:
        assert torch.equal(image(pair), image(triple))


def test_prompts_are_the_module_prompts():
    assert BUILTINS["emoji"].prompt == emoji_module.PROMPT
    assert BUILTINS["emoji-scenes"].prompt == scenes_module.PROMPT
    assert BUILTINS["emoji-categories"].prompt == categories_module.PROMPT
    assert BUILTINS["emoji-groups"].prompt == groups_module.PROMPT
    assert BUILTINS["digits"].prompt == digits_module.PROMPT
    assert BUILTINS["fashion-mnist"].prompt == fashion_module.PROMPT


def test_unknown_name_and_split():
    with pytest.raises(MMGuardError, match="digits"):
        load_builtin("mnist")
    with pytest.raises(MMGuardError, match="train"):
        load_builtin("digits", "validation")


# --- emoji -----------------------------------------------------------------------------


@needs_emoji
def test_emoji_captions():
    records = (load_builtin("emoji", "train", "pairs").records
               + load_builtin("emoji", "test", "pairs").records)
    captions = [record.captions[0] for record in records]
    by_key = {record.image.key: record.captions[0] for record in records}

    assert len(records) > 1000
    assert any(caption.startswith("flag: ") for caption in captions)
    assert "flag: France" in captions
    assert any("200d" in key for key in by_key)
    assert not [caption for caption in captions if "skin tone" in caption]
    assert not [key for key in by_key if any(f"1f3f{d}" in key for d in "bcdef")]
    assert len(set(captions)) == len(captions)
    for codepoint in (0x1F600, 0x1F431, 0x1F680, 0x1F34E):
        key = f"{codepoint:x}.png"
        assert by_key[key] == unicodedata.name(chr(codepoint)).lower(), key
    assert by_key["1f1eb-1f1f7.png"] == "flag: France"


@needs_emoji
def test_emoji_triples_answer_is_the_name():
    pairs = load_builtin("emoji", "test", "pairs")
    triples = load_builtin("emoji", "test", "triples")
    for pair, triple in zip(pairs.records, triples.records, strict=True):
        assert triple.response == pair.captions[0]
        assert triple.prompt == "What does this emoji show?"


@needs_emoji
def test_emoji_images_are_64x64_rgb_and_drawn():
    records = (load_builtin("emoji", "train", "pairs").records
               + load_builtin("emoji", "test", "pairs").records)
    chosen = records[:3]
    chosen.append(next(r for r in records if r.captions[0].startswith("flag: ")))
    chosen.append(next(r for r in records if "200d" in r.image.key))
    chosen.append(next(r for r in records if r.image.key == "1f600.png"))
    for record in chosen:
        pil = open_pil(record.image, record.where)
        assert pil.mode == "RGB"
        assert pil.size == (64, 64)
        pixels = image(record)
        assert tuple(pixels.shape) == (3, 64, 64)
        assert (pixels != 255).any(), record.image.key
        assert pixels[:, 0, 0].tolist() == [255, 255, 255]  # white background
        # A drawn emoji covers a good part of the canvas, not a few stray pixels.
        assert (pixels < 200).any(dim=0).float().mean() > 0.1, record.image.key
    # Different emoji give different pictures.
    assert not torch.equal(image(chosen[0]), image(chosen[1]))


EMOJI_TEST_EXCERPT = """\
# emoji-test.txt
# Status: fully-qualified, minimally-qualified, unqualified, component

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                       ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                   ; fully-qualified     # ☺️ E0.6 smiling face
263A                        ; unqualified         # ☺ E0.6 smiling face
1F636 200D 1F32B            ; minimally-qualified # 😶‍🌫 E13.1 face in clouds

# group: People & Body

# subgroup: hand-fingers-open
1F44B                       ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                 ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone

# subgroup: family
1F468 200D 1F469 200D 1F466 ; fully-qualified     # 👨‍👩‍👦 E2.0 family: man, woman, boy

# group: Component
1F3FB                       ; component           # 🏻 E1.0 light skin tone
1F9B0                       ; fully-qualified     # 🦰 E11.0 red hair

# group: Symbols

# subgroup: keycap
0023 FE0F 20E3              ; fully-qualified     # #️⃣ E0.6 keycap: #

# group: Flags

# subgroup: country-flag
1F1EB 1F1F7                 ; fully-qualified     # 🇫🇷 E2.0 flag: France
"""


def test_parse_emoji_test_excerpt():
    smileys = ("Smileys & Emotion", "face-smiling")
    assert parse_emoji_test(EMOJI_TEST_EXCERPT) == [
        ("\U0001F600", "grinning face", *smileys),
        ("\u263A\uFE0F", "smiling face", *smileys),
        ("\U0001F44B", "waving hand", "People & Body", "hand-fingers-open"),
        ("\U0001F468\u200D\U0001F469\u200D\U0001F466", "family: man, woman, boy",
         "People & Body", "family"),
        ("#\uFE0F\u20E3", "keycap: #", "Symbols", "keycap"),
        ("\U0001F1EB\U0001F1F7", "flag: France", "Flags", "country-flag"),
    ]


# --- emoji-captions -----------------------------------------------------------------------

CLDR_EXCERPT = """\
<?xml version="1.0" encoding="UTF-8" ?>
<ldml><annotations>
  <annotation cp="&amp;">ampersand | and | et</annotation>
  <annotation cp="&amp;" type="tts">ampersand</annotation>
  <annotation cp="\U0001F603">face | mouth | open | smile</annotation>
  <annotation cp="\U0001F603" type="tts">Grinning Face With Big Eyes</annotation>
  <annotation cp="\u263A">face | outlined | relaxed | smile | smiling face</annotation>
  <annotation cp="\U0001F1EB\U0001F1F7" type="tts">flag: France</annotation>
</annotations></ldml>
"""


def test_parse_cldr_annotations_excerpt():
    parsed = parse_cldr_annotations(CLDR_EXCERPT)
    assert parsed == {
        "&": Annotation("ampersand", ("ampersand", "and", "et")),
        "\U0001F603": Annotation("Grinning Face With Big Eyes", ("face", "mouth", "open", "smile")),
        "\u263A": Annotation(None, ("face", "outlined", "relaxed", "smile", "smiling face")),
        "\U0001F1EB\U0001F1F7": Annotation("flag: France", ()),
    }


def test_captions_of_each_source_deduplicated():
    cldr = parse_cldr_annotations(CLDR_EXCERPT)
    big_eyes = EmojiEntry("\U0001F603", "grinning face with big eyes", "Smileys & Emotion",
                          "face-smiling")
    # The CLDR short name is the emoji name in other case: dropped as a duplicate.
    assert captions_of(big_eyes, cldr) == (
        "grinning face with big eyes", "smiling face with open mouth",
        "face, mouth, open, smile", "smileys emotion, face smiling")
    # CLDR lists emoji without U+FE0F; "smiling face" is both the emoji and the
    # character name (WHITE SMILING FACE is the latter).
    smiling = EmojiEntry("\u263A\uFE0F", "smiling face", "Smileys & Emotion", "face-affection")
    assert captions_of(smiling, cldr) == (
        "smiling face", "white smiling face", "face, outlined, relaxed, smile, smiling face",
        "smileys emotion, face affection")
    # A sequence has no character name; an emoji missing from CLDR keeps the others.
    flag = EmojiEntry("\U0001F1EB\U0001F1F7", "flag: France", "Flags", "country-flag")
    assert captions_of(flag, cldr) == ("flag: France", "flags, country flag")
    assert captions_of(flag, {}) == ("flag: France", "flags, country flag")


def _images_and_captions(split: str) -> dict[str, list[str]]:
    dataset = load_builtin("emoji-captions", split, "pairs")
    return {key: [dataset.records[i].captions[0] for i in rows]
            for key, rows in dataset.records_by_image().items()}


@needs_emoji
@needs_cldr
def test_emoji_captions_several_per_image_split_by_image():
    train, test = _images_and_captions("train"), _images_and_captions("test")

    # The same images and split as `emoji`; every caption row of an image in one split.
    assert set(train) == set(keys(load_builtin("emoji", "train", "pairs")))
    assert set(test) == set(keys(load_builtin("emoji", "test", "pairs")))
    assert not set(train) & set(test)
    for captions in [*train.values(), *test.values()]:
        assert 2 <= len(captions) <= 5
        assert len({caption.casefold() for caption in captions}) == len(captions)
    assert train["1f600.png"] == ["grinning face", "face, grin, grinning face",
                                  "smileys emotion, face smiling"]
    assert train["1f603.png"][1] == "smiling face with open mouth"
    # A caption no longer names one image: subgroup phrases and keywords are shared.
    owners: dict[str, set[str]] = {}
    for key, captions in train.items():
        for caption in captions:
            owners.setdefault(caption, set()).add(key)
    assert len(owners["smileys emotion, face smiling"]) > 5
    rows = sum(len(captions) for captions in train.values())
    assert rows > 2.5 * len(train)

    triples = load_builtin("emoji-captions", "test", "triples")
    assert [r.image.key for r in triples.records] == list(test)
    assert all(r.response == test[r.image.key][0] for r in triples.records)


@needs_emoji
@needs_cldr
def test_emoji_captions_export_repeats_the_image_path(tmp_path: Path):
    dataset = load_builtin("emoji-captions", "test", "pairs")
    manifest = export_dataset(dataset, tmp_path / "export", "csv", limit=3)

    back = read_dataset(manifest)
    groups = back.records_by_image()
    assert len(groups) == 3 == len(list((tmp_path / "export" / "images").iterdir()))
    original = _images_and_captions("test")
    for key, rows in groups.items():
        stem = key.removeprefix("images/")
        assert [back.records[i].captions[0] for i in rows] == original[stem]


def test_emoji_captions_without_cldr_names_the_package(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(captions_module, "CLDR_ANNOTATIONS", (tmp_path / "en.xml",))
    captions_module._cldr.cache_clear()
    try:
        with pytest.raises(MMGuardError, match="install the Debian package unicode-cldr-core"):
            load_builtin("emoji-captions", "train", "pairs")
        # On the command line: one error line and exit code 1, no traceback.
        result = CliRunner().invoke(main, ["datasets", "export", "emoji-captions",
                                           "--out", str(tmp_path / "out")])
        assert result.exit_code == 1
        assert "error: the emoji-captions dataset needs" in result.output
        assert "unicode-cldr-core" in result.output and "Traceback" not in result.output
    finally:
        captions_module._cldr.cache_clear()


# --- emoji-scenes -------------------------------------------------------------------------


def _entries_by_code() -> dict[str, EmojiEntry]:
    return {emoji_module.image_key(entry.symbol).removesuffix(".png"): entry
            for entry in emoji_module.all_emoji()}


def _scene_codes(split: str) -> list[list[str]]:
    return [record.raw["emoji"].split() for record in load_builtin("emoji-scenes", split).records]


@needs_emoji
def test_emoji_scenes_sizes_and_no_glyph_shared_between_splits():
    train, test = _scene_codes("train"), _scene_codes("test")
    assert (len(train), len(test)) == (1500, 400)
    for codes in train + test:
        assert 2 <= len(codes) <= 4 and len(set(codes)) == len(codes)
    train_glyphs = {code for codes in train for code in codes}
    test_glyphs = {code for codes in test for code in codes}
    assert not train_glyphs & test_glyphs
    # Each side uses only its own split of the `emoji` dataset, and most of it.
    emoji_train = {key.removesuffix(".png") for key in keys(load_builtin("emoji", "train"))}
    emoji_test = {key.removesuffix(".png") for key in keys(load_builtin("emoji", "test"))}
    assert train_glyphs <= emoji_train and len(train_glyphs) > 0.9 * len(emoji_train)
    assert test_glyphs <= emoji_test and len(test_glyphs) > 0.9 * len(emoji_test)
    captions = [r.captions[0] for r in load_builtin("emoji-scenes", "train").records]
    assert len(set(captions)) == len(captions)


@needs_emoji
def test_emoji_scenes_captions_name_exactly_the_glyphs_drawn():
    by_code = _entries_by_code()
    for split, indices in (("train", (0, 1, 2, 3)), ("test", (0, 399))):
        pairs = load_builtin("emoji-scenes", split, "pairs").records
        triples = load_builtin("emoji-scenes", split, "triples").records
        for index in indices:
            record = pairs[index]
            named = [by_code[code] for code in record.raw["emoji"].split()]
            assert record.captions[0] == " and ".join(entry.name for entry in named)
            assert triples[index].response == record.captions[0]
            assert triples[index].raw["emoji"] == record.raw["emoji"]

            scene = scenes_module.scenes(split)[index]
            assert scene.key == record.image.key
            assert [glyph.entry for glyph in scene.left_to_right()] == named
            centres = [2 * glyph.left + glyph.side for glyph in scene.left_to_right()]
            assert centres == sorted(centres)
            # Each named glyph is on the canvas at its place: wherever it is opaque
            # and no later glyph covers it, the scene shows the glyph's own pixels.
            pixels = np.asarray(open_pil(record.image, record.where))
            covered = np.zeros(pixels.shape[:2], dtype=bool)
            for glyph in reversed(scene.glyphs):
                image, (left, top) = scenes_module.placed_glyph(glyph)
                rgba = np.asarray(image)
                region = (slice(top, top + rgba.shape[0]), slice(left, left + rgba.shape[1]))
                visible = (rgba[..., 3] == 255) & ~covered[region]
                assert visible.sum() > 0.5 * (rgba[..., 3] == 255).sum(), glyph.entry.name
                assert np.array_equal(pixels[region][visible], rgba[..., :3][visible])
                covered[region] |= rgba[..., 3] > 0


def _scene_digests(split: str, indices) -> list[str]:
    records = load_builtin("emoji-scenes", split).records
    digests = []
    for index in indices:
        buffer = io.BytesIO()
        open_pil(records[index].image, "x").save(buffer, format="PNG")
        digests.append(f"{records[index].captions[0]}|{hashlib.sha256(buffer.getvalue()).hexdigest()}")
    return digests


@needs_emoji
def test_emoji_scenes_identical_in_every_build():
    chosen = (("train", (0, 7, 1499)), ("test", (0, 123)))
    here = [digest for split, indices in chosen for digest in _scene_digests(split, indices)]
    assert len(set(here)) == len(here)
    # A fresh interpreter with another hash seed rebuilds the same bytes.
    script = ("from tests.test_builtin import _scene_digests\n"
              f"for split, indices in {chosen!r}:\n"
              "    print('\\n'.join(_scene_digests(split, indices)))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=300,
                            cwd=Path(__file__).parent.parent, check=True)
    assert result.stdout.splitlines() == here


def test_emoji_scenes_backgrounds():
    plain = scenes_module.Background((200, 210, 220), (200, 210, 220), (1, 0))
    assert (scenes_module.background_pixels(plain) == [200, 210, 220]).all()
    diagonal = scenes_module.Background((170, 255, 200), (255, 170, 180), (1, -1))
    pixels = scenes_module.background_pixels(diagonal).astype(int)
    size = scenes_module.SIZE
    assert pixels[size - 1, 0].tolist() == [170, 255, 200]  # bottom left: the start
    assert pixels[0, size - 1].tolist() == [255, 170, 180]  # top right: the end
    assert np.abs(np.diff(pixels, axis=1)).max() <= 1  # soft: one level per pixel at most


@needs_emoji
def test_emoji_scenes_are_512_px_and_attackers_see_them_at_64(tmp_path: Path):
    from mmguard.attack.contrastive import model_input_pixels
    from mmguard.models.registry import create_contrastive_model

    dataset = load_builtin("emoji-scenes", "test", "pairs")
    for record in dataset.records[:3]:
        pil = open_pil(record.image, record.where)
        assert (pil.mode, pil.size) == ("RGB", (512, 512))
    manifest = export_dataset(dataset, tmp_path / "export", "csv", limit=2)
    back = read_dataset(manifest)
    assert [r.raw["emoji"] for r in back.records] == [r.raw["emoji"] for r in dataset.records[:2]]
    model = create_contrastive_model("rn-tiny")
    for original, exported in zip(dataset.records[:2], back.records, strict=True):
        stored = image(exported)
        assert tuple(stored.shape) == (3, 512, 512)
        assert torch.equal(stored, image(original))
        seen = model_input_pixels(model, [to_float(stored)])
        assert tuple(seen.shape) == (1, 3, 64, 64)
        # What the attacker trains on is Pillow's bicubic resize of the stored file.
        pillow = open_pil(exported.image, exported.where).resize((64, 64), Image.BICUBIC)
        expected = to_float(torch.from_numpy(np.asarray(pillow).copy()).permute(2, 0, 1))
        assert (seen[0] - expected).abs().max() <= 1.01 / 255


def test_emoji_scenes_without_the_font_names_the_package(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(emoji_module, "FONT", tmp_path / "NotoColorEmoji.ttf")
    with pytest.raises(MMGuardError, match="install the Debian package fonts-noto-color-emoji"):
        load_builtin("emoji-scenes", "test")
    # On the command line: one error line and exit code 1, no traceback.
    result = CliRunner().invoke(main, ["datasets", "export", "emoji-scenes",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error: the emoji-scenes dataset needs" in result.output
    assert "fonts-noto-color-emoji" in result.output and "Traceback" not in result.output


# --- emoji-groups ----------------------------------------------------------------------

GROUP_ANSWERS = ["smileys and emotion", "people and body", "animals and nature",
                 "food and drink", "travel and places", "activities", "objects", "symbols",
                 "flags"]


@needs_emoji
def test_emoji_groups_answer_each_emoji_with_its_group_and_keep_the_emoji_split():
    by_key = {emoji_module.image_key(entry.symbol): entry for entry in emoji_module.all_emoji()}
    for split in ("train", "test"):
        records = load_builtin("emoji-groups", split, "triples").records
        # Every emoji of the split once (same split as `emoji`), answered with its group.
        assert sorted(keys(load_builtin("emoji-groups", split))) == sorted(
            keys(load_builtin("emoji", split)))
        for record in records:
            entry = by_key[record.image.key]
            assert record.raw["emoji_name"] == entry.name
            assert record.response == GROUP_ANSWERS[
                ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                 "Travel & Places", "Activities", "Objects", "Symbols", "Flags"].index(entry.group)]
        # Round-robin: any prefix holds every group about equally.
        counts = Counter(record.response for record in records[:135])
        assert sorted(counts) == sorted(GROUP_ANSWERS) and set(counts.values()) == {15}
    pairs = load_builtin("emoji-groups", "test", "pairs").records
    assert pairs[0].captions[0] == groups_module.CAPTION.format(
        load_builtin("emoji-groups", "test", "triples").records[0].response)


@needs_emoji
def test_emoji_groups_draw_the_glyph_at_its_planned_place_on_a_512_px_canvas():
    records = load_builtin("emoji-groups", "train", "triples").records
    by_key = {emoji_module.image_key(entry.symbol): entry for entry in emoji_module.all_emoji()}
    sides = []
    for record in records[:4]:
        plan = groups_module.plan_image(by_key[record.image.key])
        assert plan.key == record.image.key and len(plan.glyphs) == 1
        glyph = plan.glyphs[0]
        sides.append(glyph.side)
        assert groups_module.MIN_SIDE <= glyph.side <= groups_module.MAX_SIDE
        pixels = np.asarray(open_pil(record.image, record.where))
        assert pixels.shape == (512, 512, 3)
        drawn, (left, top) = scenes_module.placed_glyph(glyph)
        rgba = np.asarray(drawn)
        region = pixels[top:top + rgba.shape[0], left:left + rgba.shape[1]]
        opaque = rgba[..., 3] == 255
        assert opaque.sum() > 1000 and np.array_equal(region[opaque], rgba[..., :3][opaque])
        # Outside the glyph's box the canvas is the background.
        background = scenes_module.background_pixels(plan.background)
        outside = np.ones((512, 512), dtype=bool)
        outside[glyph.top:glyph.top + glyph.side, glyph.left:glyph.left + glyph.side] = False
        assert np.array_equal(pixels[outside], background[outside])
    assert len(set(sides)) > 1  # sizes vary


# --- emoji-categories ------------------------------------------------------------------


def test_emoji_categories_phrase_rule():
    phrase = categories_module.phrase
    # The default: the subgroup's words, a leading head noun moved to the end.
    assert phrase("face-smiling") == "smiling face"
    assert phrase("food-prepared") == "prepared food"
    assert phrase("transport-air") == "air transport"
    assert phrase("place-other") == "other place"
    assert phrase("cat-face") == "cat face"  # "cat" is no head noun
    assert phrase("sky & weather") == "sky and weather"
    assert phrase("musical-instrument") == "musical instrument"
    assert phrase("heart") == "heart"
    # The table: readability, no answer inside another, merges into a sibling.
    assert phrase("animal-mammal") == "mammal"
    assert phrase("transport-sign") == "transport sign"
    assert phrase("flag") == "other flag"
    assert phrase("country-flag") == phrase("subdivision-flag") == "country flag"
    assert phrase("plant-flower") == phrase("plant-other") == "plant"
    assert phrase("a-brand-new-subgroup") == "a brand new subgroup"


def _categories(split: str, kind: str = "triples"):
    return load_builtin("emoji-categories", split, kind)


@needs_emoji
def test_emoji_categories_answers_come_from_the_subgroups():
    by_key = {emoji_module.image_key(entry.symbol): entry for entry in emoji_module.all_emoji()}
    for split in ("train", "test"):
        emoji_keys = set(keys(load_builtin("emoji", split)))
        for record in _categories(split).records:
            entry = by_key[record.image.key]
            assert record.image.key in emoji_keys  # the `emoji` split, unchanged
            assert record.raw["emoji_name"] == entry.name
            assert record.raw["subgroup"] == entry.subgroup
            assert record.response == categories_module.phrase(entry.subgroup)
            if entry.subgroup not in categories_module.PHRASES:
                assert record.response == categories_module.default_phrase(entry.subgroup)
    answers = {record.image.key: record.response
               for split in ("train", "test") for record in _categories(split).records}
    assert answers["1f600.png"] == "smiling face"  # grinning face
    assert answers["1f1eb-1f1f7.png"] == "country flag"  # flag: France
    assert answers["1f9a7.png"] == "mammal"  # orangutan


@needs_emoji
def test_emoji_categories_classes_sizes_and_split():
    train, test = _categories("train"), _categories("test")
    train_counts = Counter(record.response for record in train.records)
    test_counts = Counter(record.response for record in test.records)
    classes = categories_module.kept_classes()

    assert not set(keys(train)) & set(keys(test))  # no glyph on both sides
    assert set(test_counts) <= set(train_counts)  # every test answer is trained on
    assert set(train_counts) == set(test_counts) == set(classes)
    assert min(train_counts.values()) >= categories_module.MIN_TRAIN
    assert min(test_counts.values()) >= categories_module.MIN_TEST
    assert len(classes) == 73
    assert (len(train.records), len(test.records)) == (1409, 382)
    # A class is dropped only for lack of emoji on one side.
    every = Counter((categories_module.phrase(entry.subgroup), emoji_module.in_split(entry, "test"))
                    for entry in emoji_module.all_emoji())
    for answer, _ in every:
        enough = (every[answer, False] >= categories_module.MIN_TRAIN
                  and every[answer, True] >= categories_module.MIN_TEST)
        assert (answer in classes) == enough, answer


@needs_emoji
def test_emoji_categories_triples_are_closed_vqa_answers():
    from mmguard.evaluate.vqa import contains_match, exact_match, normalize_answer

    classes = categories_module.kept_classes()
    for answer in classes:
        # Short lower-case phrases like fashion-mnist's "ankle boot": letters and spaces,
        # which the VQA normalisation keeps (it only drops articles: "person in role").
        assert re.fullmatch(r"[a-z]+( [a-z]+){0,3}", answer), answer
        assert normalize_answer(answer) == " ".join(
            word for word in answer.split() if word not in ("a", "an", "the"))
    for answer in classes:
        for other in classes:
            if answer != other:
                assert not exact_match(other, answer)
                assert not contains_match(other, answer), (other, answer)
    test = _categories("test")
    pairs = _categories("test", "pairs")
    for triple, pair in zip(test.records, pairs.records, strict=True):
        assert triple.prompt == "Which category is this emoji from?"
        assert triple.response in classes
        assert pair.captions == (f"an emoji of the category: {triple.response}",)


@needs_emoji
def test_emoji_categories_any_prefix_holds_every_class():
    from mmguard.lab import hold_out

    train = _categories("train")
    classes = categories_module.kept_classes()
    answers = [record.response for record in train.records]
    assert answers[:len(classes)] == list(classes)  # round-robin over the classes
    # The lab's screening slice (first 600, a fifth held out) trains on every class
    # and its held-out answers are spread: always giving the most common one scores little.
    fit, held = hold_out(train, 600, 0.2)
    held_counts = Counter(record.response for record in held.records)
    assert set(held_counts) <= {record.response for record in fit.records}
    assert len({record.response for record in fit.records}) == len(classes)
    assert max(held_counts.values()) / len(held.records) < 0.06
    assert keys(_categories("train")) == keys(train)  # the same order in every build


@needs_emoji
def test_emoji_categories_export_triples_keeps_the_columns(tmp_path: Path):
    result = CliRunner().invoke(main, ["datasets", "export", "emoji-categories", "--kind",
                                       "triples", "--split", "test", "--limit", "4",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    back = read_dataset(tmp_path / "out" / "manifest.csv")
    original = _categories("test").records[:4]
    assert [(r.prompt, r.response, r.raw["emoji_name"], r.raw["subgroup"]) for r in back.records] \
        == [(r.prompt, r.response, r.raw["emoji_name"], r.raw["subgroup"]) for r in original]
    for exported, record in zip(back.records, original, strict=True):
        assert torch.equal(image(exported), image(record))


def test_emoji_categories_without_the_emoji_list_names_the_package(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(emoji_module, "EMOJI_TEST", tmp_path / "emoji-test.txt")
    with pytest.raises(MMGuardError, match="install the Debian package unicode-data"):
        load_builtin("emoji-categories", "test")
    result = CliRunner().invoke(main, ["datasets", "export", "emoji-categories", "--kind",
                                       "triples", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error: the emoji-categories dataset needs" in result.output
    assert "unicode-data" in result.output and "Traceback" not in result.output


# --- digits ----------------------------------------------------------------------------


def test_digits_images_and_labels():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train = load_builtin("digits", "train", "triples")
    test = load_builtin("digits", "test", "triples")
    assert len(train.records) + len(test.records) == len(bunch.target) == 1797

    pairs = load_builtin("digits", "test", "pairs")
    border_values = []
    for pair, triple in zip(pairs.records, test.records, strict=True):
        index = int(triple.image.key[len("digit-"):-len(".png")])
        word = digits_module.WORDS[int(bunch.target[index])]
        assert triple.response == word
        assert pair.captions == (f"a handwritten digit {word}",)
    for record in test.records[:40]:
        pixels = image(record)
        assert tuple(pixels.shape) == (3, 8, 8)
        assert torch.equal(pixels[0], pixels[1])
        assert torch.equal(pixels[0], pixels[2])
        assert int(pixels.min()) < 128  # there is dark ink
        border = torch.cat([pixels[0, 0], pixels[0, -1], pixels[0, :, 0], pixels[0, :, -1]])
        border_values.extend(border.tolist())
    assert np.mean(np.array(border_values) == 255) > 0.5  # white paper around the digit

    first = test.records[0]
    index = int(first.image.key[len("digit-"):-len(".png")])
    expected = 255 - np.round(bunch.images[index] * 255.0 / 16.0)
    assert np.array_equal(image(first)[0].numpy(), expected.astype(np.uint8))
    assert open_pil(first.image, first.where).size == (8, 8)


# --- fashion-mnist ------------------------------------------------------------------------


def raw_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)


@needs_fashion
def test_fashion_mnist_sizes_and_items():
    train = load_builtin("fashion-mnist", "train", "pairs")
    test = load_builtin("fashion-mnist", "test", "triples")
    assert len(train.records) == 60000
    assert len(test.records) == 10000
    assert not set(keys(train)) & set(keys(test))
    assert keys(load_builtin("fashion-mnist", "test", "pairs")) == keys(test)

    root = fashion_module.ROOT
    labels = raw_idx(root / "t10k-labels-idx1-ubyte.gz", 8)
    pixels = raw_idx(root / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    assert len(labels) == 10000
    for index in (0, 1, 4321, 9999):
        record = test.records[index]
        name = fashion_module.CLASSES[int(labels[index])]
        assert record.prompt == fashion_module.PROMPT
        assert record.response == name
        loaded = image(record)
        assert tuple(loaded.shape) == (3, 28, 28)
        assert np.array_equal(loaded[0].numpy(), pixels[index])

    train_labels = raw_idx(root / "train-labels-idx1-ubyte.gz", 8)
    first = train.records[0]
    expected_name = fashion_module.CLASSES[int(train_labels[0])]
    article = "an" if expected_name[0] in "aeiou" else "a"
    assert first.captions == (f"a photo of {article} {expected_name}",)
    assert train.records[59999].captions[0].startswith("a photo of ")


# --- export -----------------------------------------------------------------------------


def test_export_csv_round_trip(tmp_path: Path):
    dataset = load_builtin("digits", "test", "pairs")
    out = tmp_path / "export"

    manifest = export_dataset(dataset, out, "csv", limit=5)

    assert manifest == out / "manifest.csv"
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert pngs == sorted(record.image.key for record in dataset.records[:5])
    assert len(pngs) == 5

    back = read_dataset(manifest)
    assert back.kind == "pairs"
    assert back.rejected == []
    assert [r.captions for r in back.records] == [r.captions for r in dataset.records[:5]]
    for original, exported in zip(dataset.records[:5], back.records, strict=True):
        assert exported.image.key == f"images/{original.image.key}"
        assert torch.equal(image(exported), image(original))


def test_export_spread_takes_images_evenly_spaced_over_the_set(tmp_path: Path):
    # A source sorted by category has one category in its first rows; spread does not.
    dataset = load_builtin("digits", "train", "pairs")
    keys = [record.image.key for record in dataset.records]
    manifest = export_dataset(dataset, tmp_path / "export", "csv", limit=4, spread=True)
    back = read_dataset(manifest)
    step = len(keys) / 4
    assert [r.image.key for r in back.records] == \
        [f"images/{keys[int(i * step)]}" for i in range(4)]
    assert [r.captions for r in back.records] == \
        [dataset.records[int(i * step)].captions for i in range(4)]
    everything = export_dataset(dataset, tmp_path / "all", "csv", limit=len(keys) + 5,
                                spread=True)
    assert len(read_dataset(everything).records) == len(keys)
    # The same from the command line; --spread without --limit is a usage error.
    result = CliRunner().invoke(main, ["datasets", "export", "digits", "--limit", "4",
                                       "--spread", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert [r.image.key for r in read_dataset(tmp_path / "cli" / "manifest.csv").records] == \
        [r.image.key for r in back.records]
    result = CliRunner().invoke(main, ["datasets", "export", "digits", "--spread",
                                       "--out", str(tmp_path / "nolimit")])
    assert result.exit_code == 2 and "--spread needs --limit" in result.output


def test_export_jsonl_round_trip(tmp_path: Path):
    dataset = load_builtin("digits", "train", "triples")
    manifest = export_dataset(dataset, tmp_path / "export", "jsonl", limit=3)
    assert manifest.name == "manifest.jsonl"
    back = read_dataset(manifest)
    assert back.kind == "triples"
    assert [(r.prompt, r.response) for r in back.records] == [
        (r.prompt, r.response) for r in dataset.records[:3]]


def test_export_llava_triples_round_trip(tmp_path: Path):
    dataset = load_builtin("digits", "test", "triples")
    out = tmp_path / "export"

    manifest = export_dataset(dataset, out, "llava", limit=4)

    assert manifest == out / "conversations.json"
    entries = json.loads(manifest.read_text(encoding="utf-8"))
    assert len(entries) == 4
    assert entries[0]["conversations"][0]["value"].startswith("<image>\n")
    back = read_dataset(manifest)
    assert back.kind == "triples"
    assert back.fmt == "llava"
    assert all(isinstance(record, TripleRecord) for record in back.records)
    assert [(r.prompt, r.response) for r in back.records] == [
        (digits_module.PROMPT, r.response) for r in dataset.records[:4]]
    for original, exported in zip(dataset.records[:4], back.records, strict=True):
        assert torch.equal(image(exported), image(original))


def test_export_llava_needs_triples(tmp_path: Path):
    with pytest.raises(MMGuardError, match="triples"):
        export_dataset(load_builtin("digits", "test", "pairs"), tmp_path / "out", "llava")
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_empty_folder(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(MMGuardError, match="not an empty folder"):
        export_dataset(load_builtin("digits", "test", "pairs"), out, "csv", limit=2)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_export_into_existing_empty_folder_and_unknown_format(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = export_dataset(load_builtin("digits", "test", "pairs"), out, "csv", limit=1)
    assert manifest.exists()
    with pytest.raises(MMGuardError, match="unknown format"):
        export_dataset(load_builtin("digits", "test", "pairs"), tmp_path / "x", "parquet")
