"""scikit-learn's handwritten digits: 1,797 8x8 grayscale images, for fast tests.

Ink is drawn dark on white. The split is a fixed hash of each image's index.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from mmguard.data.builtin.common import BuiltinItem, split_of

DESCRIPTION = "1,797 handwritten digits (8x8 grayscale), for fast tests"
SOURCE = "scikit-learn load_digits"
PROMPT = "Which digit is written in this image?"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@functools.lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are ink levels 0..16; store as 8-bit with white paper.
    images = (255 - np.round(bunch.images * 255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target


def items(split: str) -> list[BuiltinItem]:
    images, targets = _arrays()
    chosen = []
    for index, target in enumerate(targets):
        key = f"digit-{index:04d}.png"
        if split_of(key) != split:
            continue
        word = WORDS[int(target)]
        chosen.append(BuiltinItem(key=key,
                                  opener=functools.partial(Image.fromarray, images[index], "L"),
                                  captions=(f"a handwritten digit {word}",), answer=word))
    return chosen
