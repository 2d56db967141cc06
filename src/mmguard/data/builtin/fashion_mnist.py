"""Fashion-MNIST from Debian's dataset-fashion-mnist: 70,000 28x28 grayscale photos.

The official split is kept (60,000 train, 10,000 test). Captions name the
class ("a photo of a sneaker").
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from mmguard.data.builtin.common import BuiltinItem
from mmguard.errors import MMGuardError

ROOT = Path("/usr/share/datasets/fashion-mnist")
DESCRIPTION = "70,000 clothing photos in 10 classes (28x28 grayscale), official split"
SOURCE = "Debian dataset-fashion-mnist"
PROMPT = "What kind of clothing item is shown?"
CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
           "sneaker", "bag", "ankle boot")
_FILES = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST container format), gzip-compressed."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@functools.lru_cache(maxsize=2)
def _arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _FILES[split]
    images_path = ROOT / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise MMGuardError(f"fashion-mnist needs {images_path}: install the Debian package "
                           "dataset-fashion-mnist (`make install` does)")
    return read_idx(images_path), read_idx(ROOT / f"{prefix}-labels-idx1-ubyte.gz")


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def items(split: str) -> list[BuiltinItem]:
    images, labels = _arrays(split)
    chosen = []
    for index, label in enumerate(labels):
        name = CLASSES[int(label)]
        chosen.append(BuiltinItem(
            key=f"{split}-{index:05d}.png",
            opener=functools.partial(Image.fromarray, images[index], "L"),
            captions=(f"a photo of {_article(name)} {name}",), answer=name))
    return chosen
