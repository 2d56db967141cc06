"""`mmguard audit` and SSIM: checking a protected folder from the files on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8
from mmguard.data.stealth import ssim
from mmguard.errors import MMGuardError
from mmguard.evaluate.audit import audit_folder, audit_or_raise
from tests.conftest import cli_env


def _reference_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255, channel_axis=0)


def test_ssim_matches_scikit_image_on_real_and_random_images():
    record = load_builtin("emoji", "train").records[5]
    emoji = load_image_uint8(record.image, record.where)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(-8, 9, emoji.shape, generator=generator)
    noisy = (emoji.int() + noise).clamp(0, 255).to(torch.uint8)
    assert ssim(emoji, noisy) == pytest.approx(_reference_ssim(emoji, noisy), abs=1e-9)
    a = torch.randint(0, 256, (3, 23, 41), generator=generator, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 23, 41), generator=generator, dtype=torch.uint8)
    assert ssim(a, b) == pytest.approx(_reference_ssim(a, b), abs=1e-9)
    assert ssim(emoji, emoji) == pytest.approx(1.0)
    assert ssim(emoji, noisy) < 1.0
    assert ssim(emoji[:, :10, :], emoji[:, :10, :]) is None  # below the 11-px window


def _mmguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmguard", *args], capture_output=True,
                          text=True, env=cli_env(), timeout=300)


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "p"
    result = _mmguard("protect", "--dataset", "emoji", "--split", "train", "--limit", "6",
                      "--method", "random", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_audit_of_a_fresh_folder_agrees_with_its_run_record(protected):
    report = audit_folder(protected)
    record = json.loads((protected / "mmguard-run.json").read_text())
    assert report.ok, report.problems
    assert report.items == 6 and report.texts_checked == 6
    assert report.max_linf_levels == record["summary"]["max_linf_levels"] <= 8
    assert report.mean_psnr_db == pytest.approx(record["summary"]["mean_psnr_db"], abs=1e-3)
    assert 0.0 < report.min_ssim <= report.mean_ssim < 1.0


def test_audit_names_every_broken_item(protected, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(protected, broken)
    files = sorted((broken / "images").glob("*.png"))
    # 1: one pixel pushed past the budget; 2: resized; 3: deleted; 4: caption reworded.
    pixels = np.asarray(Image.open(files[0]).convert("RGB")).copy()
    pixels[0, 0, 0] = (int(pixels[0, 0, 0]) + 128) % 256
    Image.fromarray(pixels).save(files[0])
    Image.open(files[1]).convert("RGB").resize((32, 32)).save(files[1])
    files[2].unlink()
    manifest = broken / "manifest.csv"
    lines = manifest.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",a completely different caption"
    manifest.write_text("\n".join(lines) + "\n")
    report = audit_folder(broken)
    assert not report.ok and len(report.problems) == 4
    text = "\n".join(report.problems)
    assert f"images/{files[0].name}: changes a pixel by" in text and "over the budget" in text
    assert f"images/{files[1].name}: size (32, 32) differs" in text
    assert f"images/{files[2].name}: cannot be read" in text
    assert "'a completely different caption' is not the original" in text
    with pytest.raises(MMGuardError, match="fails its audit: 4 problem"):
        audit_or_raise(broken)  # what the demos do before training on a folder
    assert audit_or_raise(protected).items == 6
    result = _mmguard("audit", str(broken), "--json", str(tmp_path / "a.json"))
    assert result.returncode == 1 and "4 problem(s)" in result.stderr
    assert files[1].name in result.stderr
    assert json.loads((tmp_path / "a.json").read_text())["ok"] is False
    result = _mmguard("audit", str(protected), "--original", "emoji:train")
    assert result.returncode == 0 and "ok: every file within budget" in result.stdout
    assert _mmguard("audit", str(tmp_path)).returncode == 1  # no run record
    (broken / "mmguard-run.json").write_text('{"items": []}')
    result = _mmguard("audit", str(broken))
    assert result.returncode == 1 and "not an mmguard run record (no input, budgets)" in \
        result.stderr


def test_audit_checks_the_alpha_channel_of_transparent_images(photo_folder, tmp_path):
    from mmguard.data.sources import fingerprint, read_dataset
    from mmguard.protect.registry import create_method
    from mmguard.protect.run import protect_dataset

    dataset = read_dataset(photo_folder / "manifest.csv")
    out = tmp_path / "out"
    protect_dataset(dataset, create_method("random", eps=8 / 255), out,
                    progress=False, input_fingerprint=fingerprint(dataset))
    assert audit_folder(out).ok, audit_folder(out).problems
    sticker = out / "images" / "b.png"  # the RGBA input
    pixels = np.asarray(Image.open(sticker)).copy()
    assert pixels.shape[-1] == 4
    pixels[0, 0, 3] = (int(pixels[0, 0, 3]) + 1) % 256
    Image.fromarray(pixels, mode="RGBA").save(sticker)
    report = audit_folder(out)
    assert report.problems == ["images/b.png: its alpha channel differs from the original's "
                               "in 1 pixel(s)"]
    Image.fromarray(pixels[..., :3], mode="RGB").save(sticker)
    assert audit_folder(out).problems == ["images/b.png: has no alpha channel; the original's "
                                          "transparency was lost"]
    opaque = out / "images" / "a.png"
    rgb = np.asarray(Image.open(opaque))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
                    mode="RGBA").save(opaque)
    assert "images/a.png: has an alpha channel; the original is opaque" in \
        audit_folder(out).problems
