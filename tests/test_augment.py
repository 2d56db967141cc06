import pytest
import torch

from mmguard.attack.augment import (
    gaussian_blur,
    grayscale,
    jpeg,
    parse_augment,
    random_crop_flip,
    resize,
)
from mmguard.errors import MMGuardError


def smooth_image(height: int = 64, width: int = 64) -> torch.Tensor:
    """A smooth colour image, the kind JPEG handles well."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([0.3 + 0.4 * xx / width, 0.5 + 0.2 * torch.sin(yy / 9.0),
                        0.6 - 0.3 * yy / height]).float()


def checkerboard(height: int = 64, width: int = 64) -> torch.Tensor:
    """+1/-1 alternating every pixel, same on all channels (shape (3, H, W))."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((-1.0) ** (yy + xx)).float().expand(3, -1, -1)


def pattern_amplitude(image: torch.Tensor, reference: torch.Tensor,
                      pattern: torch.Tensor) -> float:
    """Least-squares amplitude of `pattern` in image - reference, in 8-bit levels."""
    return float(((image - reference) * pattern).sum() / (pattern * pattern).sum()) * 255


def test_jpeg_high_quality_is_close_and_low_quality_is_lossy():
    image = smooth_image()
    near = jpeg(image, 100)
    far = jpeg(image, 10)
    assert near.shape == image.shape and near.dtype == torch.float32
    assert (near - image).abs().mean() < 2 / 255
    assert (far - image).abs().mean() > 4 / 255
    # The decoded image is 8-bit.
    assert torch.equal(torch.round(far * 255) / 255, far)


def test_jpeg_removes_a_random_sign_pattern_at_quality_50():
    base = smooth_image()
    signs = (torch.randint(0, 2, (1, 64, 64), generator=torch.Generator().manual_seed(0))
             * 2 - 1.0).expand(3, -1, -1)
    protected = base + 8 / 255 * signs
    assert pattern_amplitude(protected, base, signs) == pytest.approx(8.0, abs=0.01)
    after = pattern_amplitude(jpeg(protected, 50), jpeg(base, 50), signs)
    # Energy (amplitude squared) falls to under a quarter of what it was (measured ~0.1).
    assert (after / 8.0) ** 2 < 0.25


def test_jpeg_and_the_one_pixel_checkerboard():
    base = smooth_image()
    board = checkerboard()
    protected = base + 8 / 255 * board
    # Quality 30 wipes the +-8/255 checkerboard out entirely.
    assert abs(pattern_amplitude(jpeg(protected, 30), jpeg(base, 30), board)) < 0.4
    # Quality 50 does NOT: the top-frequency DCT coefficient (~52) is quantized with
    # step 99 and rounds up to 99, so the pattern comes back stronger (~10 levels).
    assert pattern_amplitude(jpeg(protected, 50), jpeg(base, 50), board) > 6.0


def test_resize_keeps_shape_and_removes_a_one_pixel_checkerboard():
    board = checkerboard(32, 32)
    image = 0.5 + 8 / 255 * board
    out = resize(image, 0.5)
    assert out.shape == image.shape
    assert abs(pattern_amplitude(out, torch.full_like(image, 0.5), board)) < 0.05
    assert (out - 0.5).abs().max() < 0.5 / 255
    assert torch.equal(resize(image, 1.0), image)
    # At a factor that does not sample midway between pixels, only an antialiased
    # downscale averages the pattern away (plain bilinear leaves ~5 levels).
    assert (resize(image, 0.3) - 0.5).abs().max() < 0.5 / 255


def test_grayscale_uses_601_luma_and_keeps_gray_exactly():
    gray = torch.rand(1, 9, 11, generator=torch.Generator().manual_seed(0)).expand(3, -1, -1)
    assert torch.equal(grayscale(gray), gray)
    colour = torch.zeros(3, 2, 2)
    colour[0, 0, 0] = 1.0  # pure red
    colour[1, 0, 1] = 1.0  # pure green
    colour[2, 1, 0] = 1.0  # pure blue
    out = grayscale(colour)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out[0].flatten().tolist() == pytest.approx([0.299, 0.587, 0.114, 0.0])


def test_crop_flip_is_deterministic_per_seed_and_differs_between_seeds():
    image = torch.rand(3, 24, 30, generator=torch.Generator().manual_seed(0))
    first = random_crop_flip(image, torch.Generator().manual_seed(5))
    again = random_crop_flip(image, torch.Generator().manual_seed(5))
    other = random_crop_flip(image, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, image) and first.shape == image.shape


def test_crop_flip_flips_about_half_the_time_and_crops():
    image = torch.rand(3, 10, 14, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(40):
        # Full-size crop with the image's own aspect: only the flip can change it.
        out = random_crop_flip(image, gen, scale=(1.0, 1.0), ratio=(1.0, 1.0))
        if torch.equal(out, image.flip(-1)):
            flips += 1
        else:
            assert torch.equal(out, image)
    assert 10 <= flips <= 30
    cropped = random_crop_flip(image, gen, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert not torch.equal(cropped, image) and not torch.equal(cropped, image.flip(-1))


def test_blur_spreads_an_impulse_and_keeps_constants():
    impulse = torch.zeros(3, 15, 15)
    impulse[:, 7, 7] = 1.0
    out = gaussian_blur(impulse, 1.0)
    # Centre weight of a normalized 7-tap sigma-1 kernel, squared: ~0.1592.
    assert out[0, 7, 7].item() == pytest.approx(0.15924, abs=1e-4)
    assert out.sum().item() == pytest.approx(3.0, abs=1e-5)
    flat = torch.full((3, 5, 4), 0.25)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 17, 23), (3, 1, 2)])
@pytest.mark.parametrize("name, apply", [
    ("jpeg", lambda x, g: jpeg(x, 50)),
    ("resize", lambda x, g: resize(x, 0.3)),
    ("grayscale", lambda x, g: grayscale(x)),
    ("crop-flip", random_crop_flip),
    ("blur", lambda x, g: gaussian_blur(x, 5.0)),
])
def test_outputs_keep_shape_dtype_and_range(shape, name, apply):
    gen = torch.Generator().manual_seed(0)
    # Values slightly outside [0, 1] must come back inside.
    image = torch.rand(shape, generator=gen) * 1.2 - 0.1
    out = apply(image, gen)
    assert out.shape == shape, name
    assert out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_functions_reject_bad_arguments():
    image = torch.rand(3, 8, 8)
    for call in (lambda: jpeg(image, 0), lambda: jpeg(image, 101), lambda: resize(image, 0),
                 lambda: resize(image, 1.5), lambda: gaussian_blur(image, 0.0),
                 lambda: grayscale(torch.rand(8, 8)), lambda: jpeg(torch.rand(1, 8, 8), 50)):
        with pytest.raises(MMGuardError):
            call()


@pytest.mark.parametrize("spec, normalized", [
    ("jpeg:75", "jpeg:75"),
    ("resize:0.5,grayscale", "resize:0.5,grayscale"),
    ("crop-flip", "crop-flip"),
    ("blur:1.0", "blur:1"),
    ("none", "none"),
    (" JPEG:075 , Resize:0.50 ", "jpeg:75,resize:0.5"),
    ("resize:1", "resize:1"),
    ("jpeg:1,jpeg:100", "jpeg:1,jpeg:100"),
])
def test_parser_accepts_and_normalizes(spec, normalized):
    pipeline = parse_augment(spec)
    assert pipeline.spec == normalized
    assert pipeline.__name__ == normalized
    out = pipeline(torch.rand(3, 9, 7), torch.Generator().manual_seed(0))
    assert out.shape == (3, 9, 7)


def test_parsed_pipeline_applies_steps_in_order():
    image = smooth_image(20, 28)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(parse_augment("none")(image, gen), image)
    assert torch.equal(parse_augment("resize:0.5,grayscale")(image, gen),
                       grayscale(resize(image, 0.5)))
    assert torch.equal(parse_augment("grayscale,jpeg:75")(image, gen),
                       jpeg(grayscale(image), 75))
    assert torch.equal(parse_augment("blur:1.0")(image, gen), gaussian_blur(image, 1.0))
    crop = parse_augment("crop-flip")
    assert torch.equal(crop(image, torch.Generator().manual_seed(3)),
                       random_crop_flip(image, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("spec, named", [
    ("jpeg:0", "jpeg:0"), ("jpeg:101", "jpeg:101"), ("jpeg:7.5", "jpeg:7.5"),
    ("resize:0", "resize:0"), ("resize:1.5", "resize:1.5"), ("resize:abc", "resize:abc"),
    ("blur:0", "blur:0"), ("blur:-1", "blur:-1"), ("blur:nan", "blur:nan"),
    ("sharpen", "sharpen"), ("jpeg", "jpeg"), ("jpeg:", "jpeg:"), ("resize", "resize"),
    ("blur", "blur"), ("grayscale:2", "grayscale:2"), ("grayscale,rotate:90", "rotate:90"),
])
def test_parser_rejects_bad_steps_naming_them(spec, named):
    with pytest.raises(MMGuardError) as info:
        parse_augment(spec)
    message = str(info.value)
    assert repr(named) in message
    assert "valid steps: jpeg:Q" in message and "crop-flip" in message and "blur:S" in message


@pytest.mark.parametrize("spec", ["", "  ", "jpeg:75,,grayscale", "none,jpeg:75"])
def test_parser_rejects_empty_or_mixed_specs(spec):
    with pytest.raises(MMGuardError, match="valid steps"):
        parse_augment(spec)
