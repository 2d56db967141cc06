"""Shared fixtures: small real image folders with manifests."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BIN = Path(sys.executable).parent


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """A folder of 6 varied images (sizes, modes, formats, a subfolder) and manifest.csv."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = [
        ("a.jpg", "RGB", (40, 30), "JPEG"),
        ("b.png", "RGBA", (17, 23), "PNG"),
        ("c.png", "L", (32, 32), "PNG"),
        ("sub/d.png", "RGB", (64, 48), "PNG"),
        ("sub/e.webp", "RGB", (20, 20), "WEBP"),
        ("f.png", "P", (25, 31), "PNG"),
    ]
    rows = []
    for index, (name, mode, size, fmt) in enumerate(specs):
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
        array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(array.squeeze(-1) if channels == 1 else array,
                                mode="L" if mode == "P" else mode)
        if mode == "P":
            image = image.convert("P")
        image.save(root / name, format=fmt)
        rows.append({"image": name, "caption": f"photo number {index}", "source": "test"})
    rows.append({"image": "a.jpg", "caption": "a second caption of a", "source": "test"})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "source"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_manifest(root: Path, rows: list[dict], name: str = "manifest.csv") -> Path:
    path = root / name
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def adapter():
    """The tiny random `lvlm-test` LVLM (tests of LVLM code; a file may override it)."""
    import torch

    from mmguard.models.lvlm.registry import create_lvlm

    torch.manual_seed(0)
    return create_lvlm("lvlm-test")


@pytest.fixture(scope="module")
def real_images():
    """Four real emoji images from the test split, float (3, 64, 64)."""
    from mmguard.data.builtin import load_builtin
    from mmguard.data.images import load_image_uint8, to_float

    records = load_builtin("emoji", "test", "triples").records[:4]
    return [to_float(load_image_uint8(r.image, r.image.key)) for r in records]


def assert_gradients_reach_the_pixels(adapter, images, tower: str) -> None:
    """An embedded LVLM on `tower`: 17 image tokens, a finite loss whose gradient reaches
    every pixel input, and a frozen tower (no gradient kept for its weights)."""
    import torch

    from mmguard.models.lvlm.base import TextExample

    assert adapter.model.tokens_per_image() == 17
    assert adapter.model.spec.tower == tower
    images = [image.clone().requires_grad_(True) for image in images[:2]]
    out = adapter.loss(images, [TextExample("Describe the image.", "a red apple")] * 2)
    assert torch.isfinite(out.loss).all()
    grads = torch.autograd.grad(out.loss.sum(), images)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for p in adapter.model.vision.parameters())
