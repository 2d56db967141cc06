"""ImagePreprocess against open_clip's own eval transform (Pillow resize, crop, normalise)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from mmguard.data.builtin import load_builtin
from mmguard.models.preprocess import ImagePreprocess, resample_matrix

SIZE = 64
MEAN = tuple(OPENAI_DATASET_MEAN)
STD = tuple(OPENAI_DATASET_STD)
# One 8-bit level in normalised units is 1 / 255 / std: about 0.0146 for the
# OpenAI std of the red channel (0.269), 0.0150 for green (0.261). Pillow
# resamples in fixed point, so rounding ties can land one level apart (two
# where both passes disagree): max 0.035 allows that, and a mean of 2e-3 means
# well under 1 pixel in 7 is off by a level.
ONE_LEVEL = 1.0 / 255.0 / torch.tensor(STD)
MEAN_TOLERANCE = 2e-3
MAX_TOLERANCE = 0.035
# Stored sizes as Pillow (width, height).
SIZES = [(300, 200), (97, 131), (28, 28), (65, 640)]


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


@pytest.fixture(scope="module")
def emoji_images() -> list[Image.Image]:
    records = load_builtin("emoji", "train").records
    picked = records[::max(1, len(records) // 10)][:10]
    images = [record.image.opener().convert("RGB") for record in picked]
    assert len(images) == 10
    return images


@pytest.fixture(scope="module")
def reference():
    return open_clip.image_transform(SIZE, is_train=False, mean=OPENAI_DATASET_MEAN,
                                     std=OPENAI_DATASET_STD)


@pytest.fixture(scope="module")
def pp() -> ImagePreprocess:
    return ImagePreprocess(SIZE, MEAN, STD)


def test_one_level_is_about_0_0146():
    assert abs(float(ONE_LEVEL[0]) - 0.0146) < 1e-4
    assert bool((ONE_LEVEL > 0.0140).all()) and bool((ONE_LEVEL < 0.0151).all())
    assert 2.5 * float(ONE_LEVEL.min()) > MAX_TOLERANCE


def test_same_size_images_match_open_clip_exactly(emoji_images, reference, pp):
    for image in emoji_images:
        stored = image.resize((SIZE, SIZE), Image.BICUBIC)
        expected = reference(stored)
        got = pp([to_tensor(stored)])[0]
        assert got.shape == (3, SIZE, SIZE)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("stored_size", SIZES)
def test_resized_images_match_open_clip_to_rounding(emoji_images, reference, pp, stored_size):
    worst_mean, worst_max = 0.0, 0.0
    for image in emoji_images:
        stored = image.resize(stored_size, Image.BICUBIC)
        expected = reference(stored)
        got = pp([to_tensor(stored)])[0]
        assert got.shape == expected.shape == (3, SIZE, SIZE)
        diff = (got - expected).abs()
        worst_mean = max(worst_mean, float(diff.mean()))
        worst_max = max(worst_max, float(diff.max()))
    assert worst_mean <= MEAN_TOLERANCE, stored_size
    assert worst_max <= MAX_TOLERANCE, stored_size


@pytest.mark.parametrize("stored_size", [(300, 200), (97, 131), (28, 28), (640, 65),
                                         (65, 640), (100, 300)])
def test_pixels_off_the_reference_are_rare_rounding_ties(emoji_images, reference, pp,
                                                        stored_size):
    """In 8-bit levels, almost every pixel must equal open_clip's; ties are rare.

    Real rounding ties (the exact value within ~1e-6 of a half level) touch well
    under 0.5% of pixels. Resampling in another pass order than Pillow (e.g.
    horizontal first where Pillow >= 13 goes vertical first for images whose
    height shrinks more) moves ~17% of pixels by 1-3 levels.
    """
    worst = 0.0
    for image in emoji_images:
        stored = image.resize(stored_size, Image.LANCZOS)
        levels = (pp([to_tensor(stored)])[0] - reference(stored)).abs() / ONE_LEVEL[:, None, None]
        worst = max(worst, float((levels > 0.5).float().mean()))
    assert worst <= 0.005, f"{worst:.2%} of pixels differ from open_clip's transform"


def test_mixed_sizes_give_the_same_rows_as_each_alone(emoji_images, pp):
    images = [to_tensor(image.resize(size, Image.BICUBIC))
              for image, size in zip(emoji_images, SIZES + [(SIZE, SIZE)], strict=False)]
    together = pp(images)
    assert together.shape == (len(images), 3, SIZE, SIZE)
    for row, image in zip(together, images, strict=True):
        assert torch.equal(row, pp([image])[0])


def test_stacked_batch_equals_list(emoji_images, pp):
    images = [to_tensor(image.resize((97, 131), Image.BICUBIC)) for image in emoji_images[:4]]
    stacked = torch.stack(images)
    assert stacked.shape == (4, 3, 131, 97)
    from_batch = pp(stacked)
    assert from_batch.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(from_batch, pp(images))
    assert torch.equal(from_batch[2], pp([images[2]])[0])


def test_identity_size_gradient_is_one_over_std(emoji_images, pp):
    image = to_tensor(emoji_images[0]).requires_grad_(True)
    assert image.shape == (3, SIZE, SIZE)
    pp([image]).sum().backward()
    expected = (1.0 / torch.tensor(STD, dtype=torch.float32))[:, None, None].expand_as(image)
    assert torch.allclose(image.grad, expected, rtol=1e-6, atol=0)
    assert torch.equal(image.grad[0], torch.full((SIZE, SIZE), float(expected[0, 0, 0])))


@pytest.mark.parametrize("stored_size", SIZES)
def test_gradient_reaches_every_contributing_pixel(pp, stored_size):
    width, height = stored_size
    generator = torch.Generator().manual_seed(width * 1000 + height)
    # Mid-range values: bicubic overshoot never hits the [0, 1] clip, whose
    # gradient is zero where it clips.
    image = (0.3 + 0.4 * torch.rand(3, height, width, generator=generator)).requires_grad_(True)
    weights = torch.rand(1, 3, SIZE, SIZE, generator=generator) + 0.5
    (pp([image]) * weights).sum().backward()
    grad = image.grad
    assert torch.isfinite(grad).all()

    # Which stored pixels feed the centre crop: the resize's nonzero weights.
    short, long = sorted((height, width))
    new_long = int(SIZE * long / short)
    new_h, new_w = (SIZE, new_long) if height <= width else (new_long, SIZE)
    top, left = round((new_h - SIZE) / 2), round((new_w - SIZE) / 2)

    def used(in_size: int, out_size: int, start: int) -> torch.Tensor:
        if in_size == out_size:
            mask = torch.zeros(in_size, dtype=torch.bool)
            mask[start:start + SIZE] = True
            return mask
        matrix = resample_matrix(in_size, out_size, "bicubic")[start:start + SIZE]
        return (matrix != 0).any(dim=0)

    rows, cols = used(height, new_h, top), used(width, new_w, left)
    contributing = rows[:, None] & cols[None, :]
    assert contributing.any()
    nonzero = (grad != 0).all(dim=0)
    assert torch.equal(nonzero, contributing)
    assert ((grad == 0).all(dim=0) == ~contributing).all()


@pytest.mark.parametrize(("in_size", "out_size"), [(28, 64), (200, 64), (97, 64), (64, 64),
                                                   (640, 65), (7, 3), (3, 100)])
@pytest.mark.parametrize("filter_name", ["bicubic", "bilinear"])
def test_resample_rows_sum_to_one(in_size, out_size, filter_name):
    matrix = resample_matrix(in_size, out_size, filter_name)
    assert matrix.shape == (out_size, in_size)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(out_size), atol=1e-6)


def test_resize_uses_pillow_weights_not_torch_bicubic(emoji_images):
    plain = ImagePreprocess(SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ours_error, torch_error = [], []
    for image in emoji_images:
        small = image.resize((28, 28), Image.LANCZOS)
        pillow = to_tensor(small.resize((SIZE, SIZE), Image.BICUBIC))
        x = to_tensor(small)[None]
        ours = plain.resize_crop(x)[0]
        theirs = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)[0]
        ours_error.append(float((ours - pillow).abs().max()))
        torch_error.append(float((theirs - pillow).abs().max()))
    # Ours reproduces Pillow to the 8-bit level; torch's bicubic (a = -0.75) does not.
    assert max(ours_error) <= 1.0 / 255.0 + 1e-6
    assert max(torch_error) > 3.0 / 255.0
    assert all(o < t for o, t in zip(ours_error, torch_error, strict=True))
