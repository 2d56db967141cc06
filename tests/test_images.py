"""Reading images as oriented RGB uint8 tensors, and writing PNGs atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmguard.data.images import (
    has_transparency,
    load_image,
    load_image_uint8,
    open_pil,
    read_png_uint8,
    save_png_atomic,
    to_rgb,
)
from mmguard.data.records import ImageRef
from mmguard.errors import BadItemError

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def load(path: Path, item: str = "manifest.csv line 2") -> torch.Tensor:
    return load_image_uint8(ImageRef(key=path.name, path=path), item)


def pixel(image: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[:, y, x])


def close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def two_colour(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: a rotation moves the colours to known corners."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = RED
    array[:, width // 2:] = BLUE
    return Image.fromarray(array)


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# --- orientation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "tol"), [("JPEG", "photo.jpg", 12), ("PNG", "photo.png", 0)])
def test_exif_orientation_6_is_applied(tmp_path: Path, fmt: str, name: str, tol: int):
    path = tmp_path / name
    extra = {"quality": 95} if fmt == "JPEG" else {}
    two_colour(40, 20).save(path, format=fmt, exif=exif_orientation(6), **extra)
    with Image.open(path) as stored:
        assert stored.size == (40, 20)  # stored landscape, displayed portrait

    image = load(path)

    # Orientation 6 = rotate 90 degrees clockwise for display: the stored left (red)
    # half becomes the top, the stored right (blue) half becomes the bottom.
    assert tuple(image.shape) == (3, 40, 20)
    assert image.dtype == torch.uint8
    for y, x in ((0, 0), (0, 19), (5, 10)):
        assert close(pixel(image, y, x), RED, tol), (y, x, pixel(image, y, x))
    for y, x in ((39, 0), (39, 19), (34, 10)):
        assert close(pixel(image, y, x), BLUE, tol), (y, x, pixel(image, y, x))


def test_open_pil_returns_displayed_orientation(tmp_path: Path):
    path = tmp_path / "rotated.png"
    two_colour(30, 10).save(path, format="PNG", exif=exif_orientation(6))
    image = open_pil(ImageRef(key="rotated.png", path=path), "item")
    assert image.size == (10, 30)
    assert image.getpixel((0, 0))[:3] == RED
    assert image.getpixel((0, 29))[:3] == BLUE


def test_without_exif_nothing_is_rotated(tmp_path: Path):
    path = tmp_path / "plain.png"
    two_colour(40, 20).save(path, format="PNG")
    image = load(path)
    assert tuple(image.shape) == (3, 20, 40)
    assert pixel(image, 0, 0) == RED
    assert pixel(image, 0, 39) == BLUE


# --- modes -----------------------------------------------------------------------------


def test_rgba_transparency_composited_on_white(tmp_path: Path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 255, 0, 0))  # fully transparent green
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    rgba.putpixel((2, 0), (10, 20, 30, 255))  # opaque
    path = tmp_path / "alpha.png"
    rgba.save(path)

    image = load(path)

    assert tuple(image.shape) == (3, 1, 3)
    assert pixel(image, 0, 0) == WHITE
    # red over white with alpha 128/255: G = B = 255 * (1 - 128/255) = 127
    assert close(pixel(image, 0, 1), (255, 127, 127), 1)
    assert pixel(image, 0, 2) == (10, 20, 30)


def test_palette_transparency_index_becomes_white(tmp_path: Path):
    palette_image = Image.new("P", (3, 2))
    palette_image.putpalette([255, 0, 0, 0, 200, 0, 0, 0, 255] + [0, 0, 0] * 253)
    for x in range(3):
        palette_image.putpixel((x, 0), x)
        palette_image.putpixel((x, 1), (x + 1) % 3)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=1)  # index 1 (green) is transparent
    with Image.open(path) as stored:
        assert stored.mode == "P"

    image = load(path)

    assert pixel(image, 0, 0) == (255, 0, 0)
    assert pixel(image, 0, 1) == WHITE
    assert pixel(image, 0, 2) == (0, 0, 255)
    assert pixel(image, 1, 0) == WHITE
    assert pixel(image, 1, 1) == (0, 0, 255)
    assert pixel(image, 1, 2) == (255, 0, 0)


def test_grayscale_l_gives_three_equal_channels(tmp_path: Path):
    array = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    path = tmp_path / "gray.png"
    Image.fromarray(array, mode="L").save(path)

    image = load(path)

    assert tuple(image.shape) == (3, 4, 6)
    for channel in range(3):
        assert np.array_equal(image[channel].numpy(), array)


def test_grayscale_with_alpha_la(tmp_path: Path):
    la = Image.new("LA", (3, 1))
    la.putpixel((0, 0), (0, 0))  # transparent black
    la.putpixel((1, 0), (0, 128))  # half-transparent black
    la.putpixel((2, 0), (60, 255))  # opaque grey
    path = tmp_path / "la.png"
    la.save(path)

    image = load(path)

    assert pixel(image, 0, 0) == WHITE
    assert close(pixel(image, 0, 1), (127, 127, 127), 1)
    assert pixel(image, 0, 2) == (60, 60, 60)


def test_bilevel_mode_1(tmp_path: Path):
    bilevel = Image.new("1", (4, 2), 0)
    bilevel.putpixel((1, 0), 1)
    bilevel.putpixel((3, 1), 1)
    path = tmp_path / "bilevel.png"
    bilevel.save(path)
    with Image.open(path) as stored:
        assert stored.mode == "1"

    image = load(path)

    assert tuple(image.shape) == (3, 2, 4)
    assert pixel(image, 0, 1) == WHITE
    assert pixel(image, 1, 3) == WHITE
    assert pixel(image, 0, 0) == (0, 0, 0)
    assert pixel(image, 1, 2) == (0, 0, 0)


def test_cmyk_jpeg_converted_to_rgb(tmp_path: Path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"

    image = load(path)

    assert tuple(image.shape) == (3, 16, 16)
    assert close(pixel(image, 8, 8), RED, 12), pixel(image, 8, 8)


@pytest.mark.parametrize(("value", "expected"), [(65535, 255), (32768, 128), (0, 0)])
def test_16_bit_grayscale_scaled_to_8_bits(tmp_path: Path, value: int, expected: int):
    path = tmp_path / "deep.png"
    array = np.full((3, 5), value, dtype=np.uint16)
    array[0, 0] = 65535  # a bright pixel, so the image really uses 16 bits
    Image.fromarray(array).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")

    image = load(path)

    assert tuple(image.shape) == (3, 3, 5)
    assert pixel(image, 0, 0) == WHITE
    assert close(pixel(image, 2, 4), (expected,) * 3, 1), pixel(image, 2, 4)


def test_dark_16_bit_grayscale_is_not_treated_as_8_bit(tmp_path: Path):
    # A 16-bit PNG whose values all happen to be <= 255 is still 16-bit data: 200/65535
    # of full scale is almost black, not the 8-bit grey 200.
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((2, 2), 200, dtype=np.uint16)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"

    image = load(path)

    assert close(pixel(image, 0, 0), (1, 1, 1), 1), pixel(image, 0, 0)


@pytest.mark.parametrize(
    ("mode", "colour", "other"),
    [("L", 0, 100), ("RGB", (10, 20, 30), (40, 50, 60))],
)
def test_png_trns_colour_key_transparency_becomes_white(tmp_path: Path, mode, colour, other):
    # PNG tRNS on grayscale/truecolour marks one colour as fully transparent; the module
    # promises that transparency is composited on white, like RGBA and palette images.
    keyed = Image.new(mode, (2, 1), colour)
    keyed.putpixel((1, 0), other)
    path = tmp_path / "keyed.png"
    keyed.save(path, transparency=colour)

    image = load(path)

    assert pixel(image, 0, 0) == WHITE
    expected_other = (other,) * 3 if mode == "L" else other
    assert pixel(image, 0, 1) == expected_other


def test_to_rgb_leaves_rgb_unchanged_and_converts_float():
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb) is rgb

    floats = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32), mode="F")
    converted = to_rgb(floats)
    assert converted.mode == "RGB"
    array = np.asarray(converted)
    assert array[0, 0].tolist() == [0, 0, 0]
    assert abs(int(array[0, 1, 0]) - 128) <= 1
    assert array[1, 0].tolist() == [255, 255, 255]
    assert array[1, 1].tolist() == [255, 255, 255]  # clipped, not wrapped


def test_no_resizing(tmp_path: Path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(53, 37, 3), dtype=np.uint8)
    path = tmp_path / "odd.png"
    Image.fromarray(array).save(path)

    image = load(path)

    assert tuple(image.shape) == (3, 53, 37)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), array)


# --- bad files --------------------------------------------------------------------------


def noisy_image(path: Path, fmt: str) -> None:
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path, format=fmt)


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_missing(path: Path) -> None:
    pass


def make_empty(path: Path) -> None:
    path.write_bytes(b"")


def make_text(path: Path) -> None:
    path.write_text("image,caption\nthis is not an image\n", encoding="utf-8")


def make_truncated_png(path: Path) -> None:
    noisy_image(path, "PNG")
    truncate_half(path)


def make_truncated_jpeg(path: Path) -> None:
    noisy_image(path, "JPEG")
    truncate_half(path)


def make_directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("missing.png", make_missing, "not found"),
        ("empty.png", make_empty, "empty"),
        ("notes.png", make_text, "not a recognised image format"),
        ("cut.png", make_truncated_png, "cannot decode"),
        ("cut.jpg", make_truncated_jpeg, "cannot decode"),
        ("folder.png", make_directory, "not a file"),
    ],
)
def test_bad_files_raise_bad_item_error(tmp_path: Path, name, make, reason):
    path = tmp_path / name
    make(path)
    item = f"manifest.csv line 7 ({name})"

    with pytest.raises(BadItemError) as info:
        load(path, item)

    error = info.value
    assert error.item == item
    assert reason in error.reason
    assert item in str(error)
    assert reason in str(error)


# --- openers and PNG writing ---------------------------------------------------------------


def test_opener_loads_like_the_file(tmp_path: Path):
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, size=(9, 11, 4), dtype=np.uint8)
    array[0, 0, 3] = 0
    path = tmp_path / "rgba.png"
    Image.fromarray(array, mode="RGBA").save(path)

    from_file = load(path)
    from_memory = load_image_uint8(
        ImageRef(key="rgba.png", opener=lambda: Image.fromarray(array, mode="RGBA")), "mem")

    assert tuple(from_memory.shape) == (3, 9, 11)
    assert torch.equal(from_file, from_memory)
    assert pixel(from_memory, 0, 0) == WHITE


def test_opener_with_exif_orientation(tmp_path: Path):
    path = tmp_path / "rotated.png"
    two_colour(40, 20).save(path, format="PNG", exif=exif_orientation(6))
    from_memory = load_image_uint8(ImageRef(key="r.png", opener=lambda: Image.open(path)), "mem")
    assert torch.equal(from_memory, load(path))
    assert tuple(from_memory.shape) == (3, 40, 20)


def test_opener_failure_is_bad_item_error():
    def broken() -> Image.Image:
        raise OSError("the archive member is corrupt")

    with pytest.raises(BadItemError) as info:
        load_image_uint8(ImageRef(key="x.png", opener=broken), "builtin:demo x.png")
    assert "builtin:demo x.png" in str(info.value)
    assert "cannot decode" in str(info.value)


def test_save_png_atomic_round_trip(tmp_path: Path):
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.integers(0, 256, size=(3, 13, 17), dtype=np.uint8))
    target = tmp_path / "out" / "nested" / "protected.png"

    save_png_atomic(image, target)

    assert sorted(p.name for p in target.parent.iterdir()) == ["protected.png"]
    back = read_png_uint8(target)
    assert back.dtype == torch.uint8
    assert torch.equal(back, image)
    assert torch.equal(load(target), image)

    # Overwriting an existing file also leaves exactly one file behind.
    second = 255 - image
    save_png_atomic(second, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["protected.png"]
    assert torch.equal(read_png_uint8(target), second)


# --- transparency kept as stored ------------------------------------------------------------


def _transparent_files(folder: Path) -> dict[str, Path]:
    """The ways an image can carry transparency: alpha channels, a palette entry, tRNS."""
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row, with colour values of its own
    la = rng.integers(0, 256, size=(6, 7, 2), dtype=np.uint8)
    la[0, 0, 1] = 0
    palette = Image.new("P", (7, 6))
    palette.putpalette([255, 0, 0, 0, 200, 0, 0, 0, 255] + [0, 0, 0] * 253)
    for x in range(7):
        for y in range(6):
            palette.putpixel((x, y), (x + y) % 3)
    keyed = Image.fromarray(rng.integers(0, 256, size=(6, 7), dtype=np.uint8), mode="L")
    paths = {name: folder / f"{name}.png" for name in ("rgba", "la", "palette", "keyed")}
    Image.fromarray(rgba, mode="RGBA").save(paths["rgba"])
    Image.fromarray(la, mode="LA").save(paths["la"])
    palette.save(paths["palette"], transparency=1)
    keyed.save(paths["keyed"], transparency=int(np.asarray(keyed)[0, 0]))
    return paths


def test_load_image_keeps_stored_colour_and_alpha_beside_the_composited_rgb(tmp_path: Path):
    for name, path in _transparent_files(tmp_path).items():
        decoded = load_image(ImageRef(key=path.name, path=path), name)
        with Image.open(path) as stored:
            assert has_transparency(stored), name
            rgba = np.asarray(stored.convert("RGBA"))
        assert torch.equal(decoded.rgb, load(path)), name  # models see the same image
        assert torch.equal(decoded.alpha[0], torch.from_numpy(rgba[..., 3].copy())), name
        assert torch.equal(decoded.colour, torch.from_numpy(rgba[..., :3].copy())
                           .permute(2, 0, 1)), name
        assert tuple(decoded.stored.shape) == (4, 6, 7)
        assert int(decoded.alpha.min()) == 0, name  # some pixel really is transparent


def test_opaque_images_have_no_alpha(tmp_path: Path):
    palette = Image.new("P", (4, 3))  # a palette without a transparent entry
    path = tmp_path / "opaque.png"
    palette.save(path)
    decoded = load_image(ImageRef(key="opaque.png", path=path), "opaque")
    assert decoded.alpha is None and decoded.colour is decoded.rgb
    assert decoded.stored is decoded.rgb


def test_rgba_png_round_trip_keeps_alpha(tmp_path: Path):
    rng = np.random.default_rng(6)
    image = torch.from_numpy(rng.integers(0, 256, size=(4, 5, 9), dtype=np.uint8))
    target = tmp_path / "rgba.png"
    save_png_atomic(image, target)
    with Image.open(target) as written:
        assert written.mode == "RGBA"
    assert torch.equal(read_png_uint8(target), image)


def test_loaded_pairs_keep_8_bit_images_and_hand_out_floats():
    from mmguard.attack.contrastive import caption_rows, load_pairs
    from mmguard.data.builtin import load_builtin
    from mmguard.data.images import FloatImages, to_float
    from mmguard.data.release import per_caption_images

    dataset = load_builtin("digits", "train", "pairs")
    pairs = load_pairs(dataset)
    assert isinstance(pairs.images, FloatImages)
    assert all(stored.dtype == torch.uint8 for stored in pairs.images.stored)
    first = pairs.images[0]
    assert first.dtype == torch.float32 and torch.equal(first, to_float(pairs.images.stored[0]))
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    head = pairs.images[:3]
    assert isinstance(head, FloatImages) and len(head) == 3
    assert torch.equal(head[2], pairs.images[2])
    assert len(list(pairs.images)) == len(pairs.images) == len(dataset.records_by_image())
    with pytest.raises(IndexError):
        pairs.images[len(pairs.images)]
    rows = caption_rows(pairs, dataset)  # one caption per row: each row shares its stored image
    assert len(rows.images) == len(per_caption_images(dataset).records)
    assert rows.images.stored[0] is pairs.images.stored[0]
