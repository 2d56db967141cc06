"""The protect pipeline through the Python API: outputs, budget, run record, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmguard.data.budget import quantize_release, quantize_within_budget
from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image, load_image_uint8, read_png_uint8, to_float
from mmguard.data.records import ImageRef
from mmguard.data.sources import fingerprint, read_dataset
from mmguard.data.stealth import linf_levels
from mmguard.errors import MMGuardError
from mmguard.protect.base import ProtectionItem
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset
from tests.conftest import write_manifest


def run(dataset, out: Path, eps=8 / 255, seed=0, batch_size=16, **kwargs):
    method = create_method("random", dataset.kind, eps=eps, seed=seed)
    return protect_dataset(dataset, method, out, progress=False,
                           input_fingerprint=fingerprint(dataset), batch_size=batch_size,
                           **kwargs)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_every_image_written_at_original_size_within_budget(photo_folder, tmp_path):
    dataset = read_dataset(photo_folder / "manifest.csv")
    out = tmp_path / "out"
    summary = run(dataset, out, eps=0.03)  # 7.65 levels: rounding must not reach 8
    assert summary.finished == 6
    for ref in dataset.images():
        original = load_image(ref, ref.key)
        stem = ref.key.rsplit(".", 1)[0]
        saved = read_png_uint8(out / "images" / f"{stem}.png")
        assert saved.shape == original.stored.shape
        assert saved.shape[0] == (4 if ref.key == "b.png" else 3)  # b.png is RGBA
        assert 1 <= linf_levels(original.colour, saved[:3]) <= 7
    record = json.loads((out / "mmguard-run.json").read_text())
    assert record["status"] == "complete"
    assert record["budgets"]["eps_levels"] == 7
    assert {i["key"] for i in record["items"]} == {r.key for r in dataset.images()}
    assert all(i["linf_levels"] <= 7 and i["psnr_db"] > 30 for i in record["items"])
    assert record["versions"]["torch"] and record["config"]["method"] == "random"


def test_transparent_inputs_come_back_rgba_with_their_alpha_byte_identical(tmp_path):
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, size=(12, 10, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 255  # opaque rows, where composited and stored colour agree
    rgba[4:6, :, 3] = 0  # transparent rows with colour values of their own
    palette = Image.fromarray(rng.integers(0, 3, size=(9, 8), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 200, 0, 0, 0, 255] + [0, 0, 0] * 253)
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(rgba, mode="RGBA").save(root / "sticker.png")
    palette.save(root / "palette.png", transparency=1)  # a tRNS chunk: index 1 transparent
    Image.fromarray(rgba[..., :3], mode="RGB").save(root / "opaque.png")
    dataset = read_dataset(write_manifest(root, [
        {"image": name, "caption": f"picture {name}"}
        for name in ("sticker.png", "palette.png", "opaque.png")]))
    eps = 8 / 255
    run(dataset, tmp_path / "out", eps=eps)
    items = {i["key"]: i for i in json.loads((tmp_path / "out" / "mmguard-run.json")
                                             .read_text())["items"]}
    method = create_method("random", eps=eps, seed=0)
    for ref in dataset.images():
        path = tmp_path / "out" / "images" / ref.key
        original = load_image(ref, ref.key)
        with Image.open(path) as written, Image.open(ref.path) as stored:
            assert written.mode == ("RGB" if ref.key == "opaque.png" else "RGBA")
            if ref.key != "opaque.png":
                assert np.array_equal(np.asarray(written)[..., 3],
                                      np.asarray(stored.convert("RGBA"))[..., 3])
        saved = read_png_uint8(path)
        # The budget holds on the colour channels against the stored colour values.
        assert 1 <= linf_levels(original.colour, saved[:3]) <= 8
        assert items[ref.key].get("alpha", False) == (ref.key != "opaque.png")
        # The method saw the image composited on white, exactly as before.
        [result] = method.protect_batch([ProtectionItem(ref.key, to_float(original.rgb),
                                                        ["x"])])
        assert torch.equal(saved, quantize_release(original, result.image, eps))
        opaque_rows = quantize_within_budget(original.rgb, result.image, eps)[:, :4]
        if ref.key == "sticker.png":
            assert torch.equal(saved[:3, :4], opaque_rows)


def test_manifest_mirrors_input_rows_and_columns(photo_folder, tmp_path):
    dataset = read_dataset(photo_folder / "manifest.csv")
    out = tmp_path / "out"
    run(dataset, out)
    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (photo_folder / "manifest.csv").open() as handle:
        source_rows = list(csv.DictReader(handle))
    assert [r["caption"] for r in rows] == [r["caption"] for r in source_rows]
    assert all(r["source"] == "test" for r in rows)
    assert rows[0]["image"] == "images/a.png" and rows[-1]["image"] == "images/a.png"
    assert rows[3]["image"] == "images/sub/d.png"
    reread = read_dataset(out / "manifest.csv")
    assert all(load_image_uint8(ref, ref.key).shape[0] == 3 for ref in reread.images())


def test_same_seed_is_byte_identical_across_batch_sizes_other_seed_differs(tmp_path):
    dataset = load_builtin("digits", "test", "pairs")
    run(dataset, tmp_path / "a", limit=20, batch_size=16)
    run(dataset, tmp_path / "b", limit=20, batch_size=3)
    run(dataset, tmp_path / "c", limit=20, seed=1)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert len(tree_digest(tmp_path / "a")) == 20
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_resume_finishes_without_rewriting_and_limit_can_grow(tmp_path):
    dataset = load_builtin("digits", "train", "pairs")
    out = tmp_path / "out"
    run(dataset, out, limit=10)
    before = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    summary = run(dataset, out, limit=25, resume=True)
    assert summary.finished == 25 and summary.written_now == 15
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())
    run(dataset, tmp_path / "straight", limit=25)
    assert tree_digest(out) == tree_digest(tmp_path / "straight")
    history = json.loads((out / "mmguard-run.json").read_text())["history"]
    assert len(history) == 2


def test_resume_refuses_other_settings(tmp_path):
    dataset = load_builtin("digits", "train", "pairs")
    out = tmp_path / "out"
    run(dataset, out, limit=5)
    with pytest.raises(MMGuardError, match="seed: was 0, now 3"):
        run(dataset, out, limit=5, seed=3, resume=True)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_inside_the_input_folder_is_refused(photo_folder, where):
    dataset = read_dataset(photo_folder / "manifest.csv")
    out = photo_folder if where == "same" else photo_folder / "protected"
    with pytest.raises(MMGuardError, match="inside"):
        run(dataset, out)
    assert not (photo_folder / "protected").exists()


def test_non_empty_output_folder_is_refused_and_earlier_run_needs_resume(photo_folder, tmp_path):
    dataset = read_dataset(photo_folder / "manifest.csv")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MMGuardError, match="not empty"):
        run(dataset, foreign)
    run(dataset, tmp_path / "out")
    with pytest.raises(MMGuardError, match="--resume"):
        run(dataset, tmp_path / "out")


def noisy_image(seed: int, size=(32, 32)) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array)


def truncate(path: Path) -> bytes:
    """Cut a PNG in half (header intact, pixel data incomplete); return the full bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def _folder_with_problems(root: Path) -> Path:
    root.mkdir()
    for index, name in enumerate(("good1.png", "good2.png", "x.png", "x.jpg", "trunc.png")):
        noisy_image(index).save(root / name)
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    truncate(root / "trunc.png")
    return write_manifest(root, [
        {"image": "good1.png", "caption": "fine"},
        {"image": "missing.png", "caption": "gone"},
        {"image": "zero.png", "caption": "zero bytes"},
        {"image": "text.png", "caption": "wrong format"},
        {"image": "../../etc/passwd", "caption": "escape"},
        {"image": "/etc/passwd", "caption": "absolute"},
        {"image": "good2.png", "caption": "   "},
        {"image": "x.png", "caption": "one"},
        {"image": "x.jpg", "caption": "same output name"},
        {"image": "trunc.png", "caption": "truncated"},
        {"image": "good2.png", "caption": "x" * 20_000},
    ])


def test_bad_items_are_all_named_before_any_work(tmp_path):
    dataset = read_dataset(_folder_with_problems(tmp_path / "in"))
    with pytest.raises(MMGuardError) as caught:
        run(dataset, tmp_path / "out")
    message = str(caught.value)
    for expected in ("missing.png", "not found", "zero.png", "empty", "text.png",
                     "not a recognised image format", "../../etc/passwd", "outside",
                     "/etc/passwd", "absolute", "empty caption", "x.jpg", "same as",
                     "20,000 characters"):
        assert expected in message, expected
    assert "line 3" in message  # rows are named by their line in the manifest
    assert not (tmp_path / "out").exists()


def test_skip_bad_completes_and_lists_every_bad_item_with_reason(tmp_path):
    dataset = read_dataset(_folder_with_problems(tmp_path / "in"))
    summary = run(dataset, tmp_path / "out", skip_bad=True)
    assert summary.finished == 2  # good1 and x.png; good2 has an empty caption
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    reasons = " | ".join(f"{s['item']}: {s['reason']}" for s in record["skipped"])
    assert len(record["skipped"]) == 9  # good2 has two bad rows, each listed
    assert "trunc.png" in reasons and "cannot decode" in reasons  # found only when decoding
    with (tmp_path / "out" / "manifest.csv").open() as handle:
        assert [r["caption"] for r in csv.DictReader(handle)] == ["fine", "one"]


def test_a_bad_image_found_mid_run_keeps_what_was_finished(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    rows = []
    for index in range(5):
        noisy_image(index).save(root / f"{index}.png")
        rows.append({"image": f"{index}.png", "caption": f"image {index}"})
    data = truncate(root / "3.png")  # the header reads fine; decoding fails mid-run
    dataset = read_dataset(write_manifest(root, rows))
    with pytest.raises(MMGuardError) as caught:
        run(dataset, tmp_path / "out", batch_size=1)
    assert "3.png" in str(caught.value) and "3 item(s) finished" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png")) == \
        ["0.png", "1.png", "2.png"]
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["status"] == "failed" and "3.png" in record["error"]
    (root / "3.png").write_bytes(data)  # the user fixes the file and resumes
    summary = run(dataset, tmp_path / "out", batch_size=1, resume=True)
    assert summary.finished == 5 and summary.written_now == 2


def test_triples_from_builtin_dataset_keep_prompts_and_responses(tmp_path):
    dataset = load_builtin("digits", "test", "triples")
    out = tmp_path / "out"
    run(dataset, out, limit=4)
    reread = read_dataset(out / "manifest.csv")
    assert reread.kind == "triples" and len(reread.records) == 4
    assert [r.response for r in reread.records] == [r.response for r in dataset.records[:4]]
    for original, record in zip(dataset.records[:4], reread.records, strict=True):
        assert record.prompt == original.prompt
        saved = read_png_uint8(out / record.image.key)
        assert saved.shape == (3, 8, 8)
        assert 1 <= linf_levels(load_image_uint8(original.image, "x"), saved) <= 8


def test_method_refuses_options_it_would_ignore():
    with pytest.raises(MMGuardError, match="--surrogate"):
        create_method("random", surrogates=("rn-test",))
    with pytest.raises(MMGuardError, match="unknown method"):
        create_method("nope")


def test_in_memory_images_protect_like_files(tmp_path):
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    ref = ImageRef("m.png", opener=lambda: image)
    assert load_image_uint8(ref, "m").shape == (3, 4, 5)
