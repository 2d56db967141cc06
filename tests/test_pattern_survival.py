"""benchmarks/pattern_survival.py: the share of a perturbation each attacker
transformation keeps, for random patterns and for a saved release."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.pattern_survival import kept_shares, release_survival, survival
from tests.conftest import cli_env

EPS = 8 / 255


def _checkerboard(size: int, gray: bool) -> torch.Tensor:
    """A +-eps one-pixel checkerboard, in luma (gray) or with R and G of opposite sign."""
    board = ((torch.arange(size)[:, None] + torch.arange(size)[None]) % 2 * 2 - 1).float() * EPS
    if gray:
        return board.expand(3, size, size)
    return torch.stack([board, -board, board])


def test_a_gray_pattern_survives_grayscale_whole_and_a_checkerboard_does_not_survive_resizing():
    generator = torch.Generator().manual_seed(0)
    gray_image = (torch.rand(1, 16, 16, generator=generator) * 0.5 + 0.25).expand(3, 16, 16)
    shares = kept_shares([(gray_image, gray_image + _checkerboard(16, gray=True))],
                         artefacts=True)
    assert shares["grayscale"] == pytest.approx(1.0, abs=1e-3)
    assert shares["grayscale artefacts"] == 0.0  # a gray image is its own grayscale
    assert shares["resize:0.5"] < 0.1  # a one-pixel checkerboard averages away
    colour = kept_shares([(gray_image, gray_image + _checkerboard(16, gray=False))])
    # luma of (+1, -1, +1) is 0.299 - 0.587 + 0.114 = -0.174: almost all of it is lost
    assert colour["grayscale"] < 0.1
    assert "grayscale artefacts" not in colour
    with pytest.raises(SystemExit, match="nothing to measure"):
        kept_shares([(gray_image, gray_image.clone())])


def test_a_grid_of_8_cells_survives_a_model_that_reads_a_quarter_of_the_side():
    # A 128-px image seen at 32 px (as a 128-px model sees a 512-px photo): per-pixel
    # signs average away, 8 x 8 cells of 16 px stay.
    generator = torch.Generator().manual_seed(1)
    stored = [(torch.rand(3, 128, 128, generator=generator) * 128 + 64).to(torch.uint8)
              for _ in range(2)]
    per_pixel = survival(stored, coarse=1, gray=True)
    cells = survival(stored, coarse=1, gray=True, cells=8)
    assert per_pixel["resize:0.25"] < 0.15 < 0.9 < cells["resize:0.25"]
    assert cells["grayscale"] == pytest.approx(per_pixel["grayscale"], abs=0.05)


@pytest.mark.parametrize("options, luma", [((), False), (("--gray-noise", "--coarse", "4"), True)])
def test_a_saved_release_is_measured_against_its_originals(tmp_path, options, luma):
    out = tmp_path / "release"
    result = subprocess.run(
        [sys.executable, "-m", "mmguard", "protect", "--dataset", "emoji", "--split", "train",
         "--limit", "4", "--method", "random", *options, "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    shares = release_survival(out, 4)
    # Luma noise is what grayscale keeps (up to clipping at 0 and 1); colour noise loses
    # more than half of its energy to it.
    assert (shares["grayscale"] > 0.9) if luma else (shares["grayscale"] < 0.6)
    assert shares["grayscale artefacts"] > 0.0  # the emoji are in colour
    assert (shares["resize:0.5"] > 0.6) if luma else (shares["resize:0.5"] < 0.4)
