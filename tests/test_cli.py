"""The `mmguard` command through a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from mmguard.data.images import load_image_uint8, read_png_uint8
from mmguard.data.records import ImageRef
from mmguard.data.stealth import linf_levels
from tests.conftest import cli_env

MMGUARD = [sys.executable, "-m", "mmguard"]


def mmguard(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*MMGUARD, *args], capture_output=True, text=True, env=cli_env(),
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"mmguard {' '.join(args)} failed:\n{result.stderr}")
    return result


def test_help_explains_every_protect_option():
    text = mmguard("protect", "--help").stdout
    for option in ("--data", "--dataset", "--method", "--eps", "--out", "--limit", "--seed",
                   "--resume", "--skip-bad", "--surrogate", "--trigger-len"):
        assert option in text
    assert "8/255" in text


def test_protect_without_a_method_uses_the_recommended_one_and_says_why(tmp_path):
    out = tmp_path / "o"
    result = mmguard("protect", "--dataset", "digits", "--limit", "6", "--surrogate", "rn-test",
                     "--groups", "2", "--pgd-steps", "2", "--rounds", "2", "--clean-epochs", "1",
                     "--out", str(out), "--quiet")
    assert "using wrong-target" in result.stderr and "Caveat" in result.stderr  # pairs: weak
    # ... in the measured setting, named; what the user gives wins.
    assert "--step-schedule cosine, --step-size 2/255" in result.stderr
    record = json.loads((out / "mmguard-run.json").read_text())
    assert record["config"]["method"] == "wrong-target"
    assert record["config"]["step_schedule"] == "cosine"
    assert record["config"]["step_size"] == pytest.approx(2 / 255)
    mine = mmguard("protect", "--dataset", "digits", "--limit", "4", "--surrogate", "rn-test",
                   "--groups", "2", "--pgd-steps", "1", "--step-schedule", "constant",
                   "--rounds", "2", "--clean-epochs", "1",
                   "--out", str(tmp_path / "mine"), "--quiet")
    assert "--step-size 2/255" in mine.stderr
    config = json.loads((tmp_path / "mine" / "mmguard-run.json").read_text())["config"]
    assert config["step_schedule"] == "constant"
    assert config["step_size"] == pytest.approx(2 / 255)


def test_a_recommendation_names_its_options_as_protect_flags():
    from mmguard.protect.recommend import Recommendation, as_flags

    chosen = Recommendation("wrong-target", "measured", options={
        "pgd_steps": 25, "step_size": 2 / 255, "pretrained_too": True, "robust_every": False})
    assert chosen.describe_options() == "--pgd-steps 25, --step-size 2/255, --pretrained-too"
    # a share is no budget: it reads as itself, not as levels of 255
    assert as_flags({"pattern_share": 0.5, "eps": 4 / 255}) == "--pattern-share 0.5, --eps 4/255"


def test_strength_presets_set_the_budget_unless_eps_is_given(tmp_path):
    from mmguard.protect.recommend import apply_strength

    assert apply_strength("wrong-target", "low", None, {}) == (4 / 255, {"pgd_steps": 20})
    assert apply_strength("wrong-target", "high", None, {"pgd_steps": 7}) == (
        16 / 255, {"pgd_steps": 7})
    # A recommendation's measured steps are what the preset scales; the user's still win.
    measured = {"pgd_steps": 100, "step_schedule": "cosine"}
    assert apply_strength("wrong-target", "low", None, {}, base=measured) == (
        4 / 255, {"pgd_steps": 50, "step_schedule": "cosine"})
    assert apply_strength("wrong-target", None, None, {"step_schedule": "constant"},
                          base=measured) == (8 / 255, {"pgd_steps": 100,
                                                       "step_schedule": "constant"})
    assert apply_strength("wrong-target", "high", None, {"pgd_steps": 3}, base=measured)[1] == {
        "pgd_steps": 3, "step_schedule": "cosine"}
    assert apply_strength("random", "high", 2 / 255, {}) == (2 / 255, {})
    assert apply_strength("random", None, None, {}) == (8 / 255, {})
    high = mmguard("protect", "--dataset", "digits", "--method", "random", "--strength",
                   "high", "--limit", "4", "--out", str(tmp_path / "h"), "--quiet")
    assert "budget 16/255" in high.stdout
    record = json.loads((tmp_path / "h" / "mmguard-run.json").read_text())
    assert record["budgets"]["eps_levels"] == 16
    assert 8 < record["summary"]["max_linf_levels"] <= 16


def test_large_images_get_the_recommendations_large_image_setting(tmp_path):
    from mmguard.protect.recommend import RECOMMENDED, STRENGTHS

    chosen = RECOMMENDED["triples"]
    side = chosen.large_side
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = ["image,prompt,response"]
    for index in range(3):  # flat canvases, as the 512-px set's
        Image.new("RGB", (side + 40, side), (200, 180 + index, 90)).save(folder / f"{index}.png")
        rows.append(f"{index}.png,What is shown?,thing {index % 2}")
    (folder / "qa.csv").write_text("\n".join(rows) + "\n")
    common = ["protect", "--data", str(folder / "qa.csv"), "--surrogate", "lvlm-test",
              "--pgd-steps", "1", "--quiet"]
    result = mmguard(*common, "--out", str(tmp_path / "auto"))
    assert f"images of {side} px" in result.stderr
    assert f"--strength {chosen.large_strength} with --pattern-share 0.5" in result.stderr
    record = json.loads((tmp_path / "auto" / "mmguard-run.json").read_text())
    assert record["budgets"]["eps_levels"] == round(STRENGTHS[chosen.large_strength].eps * 255)
    measured = {name: value for name, value in chosen.large_options.items()
                if name != "pgd_steps"}
    assert measured  # the large-image setting is more than a budget
    assert {name: record["config"][name] for name in measured} == measured
    assert record["config"]["pgd_steps"] == 1  # the user's steps still win
    # --gray-noise moves the collision half in luma too, around the same setting
    luma = mmguard(*common, "--gray-noise", "--out", str(tmp_path / "luma"))
    assert f"images of {side} px" in luma.stderr
    record = json.loads((tmp_path / "luma" / "mmguard-run.json").read_text())
    assert record["config"]["gray_noise"] is True
    assert {name: record["config"][name] for name in measured} == measured
    mine = mmguard(*common, "--eps", "8/255", "--out", str(tmp_path / "mine"))
    assert "images of" not in mine.stderr
    record = json.loads((tmp_path / "mine" / "mmguard-run.json").read_text())
    assert record["budgets"]["eps_levels"] == 8
    assert record["config"]["pattern_share"] == 0  # a chosen budget leaves the setting too


def test_size_strength_reads_the_median_shorter_side(tmp_path):
    from mmguard.protect.recommend import Recommendation, size_strength

    def image(name: str, size: tuple[int, int]) -> ImageRef:
        Image.new("RGB", size).save(tmp_path / name)
        return ImageRef(name, path=tmp_path / name)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    large = [image("a.png", (900, 600)), image("b.png", (600, 700)),
             ImageRef("broken.png", path=broken), image("c.png", (40, 30))]
    chosen = Recommendation("wrong-target", "measured", large_side=512, large_strength="low")
    assert size_strength(chosen, large) == ("low", 600)  # the unreadable file is left out
    assert size_strength(chosen, large[2:]) is None  # only a 30-px image is readable
    assert size_strength(Recommendation("wrong-target", "measured"), large) is None


def test_datasets_list_names_each_builtin():
    from mmguard.data.builtin import BUILTINS

    lines = mmguard("datasets", "list").stdout.splitlines()
    assert [line.split()[0] for line in lines[::2]] == list(BUILTINS)
    # Descriptions and sources line up, however long the names.
    width = max(map(len, BUILTINS))
    assert all(line[width] == " " != line[width + 1] for line in lines[::2])
    assert all(line.startswith(" " * (width + 1) + "source: ") for line in lines[1::2])


def test_export_then_protect_writes_every_item_within_budget(tmp_path):
    exported, out = tmp_path / "A", tmp_path / "B"
    mmguard("datasets", "export", "emoji", "--split", "train", "--out", str(exported),
            "--limit", "40")
    result = mmguard("protect", "--data", str(exported / "manifest.csv"), "--method", "random",
                     "--eps", "8/255", "--out", str(out), "--quiet")
    assert "protected 40 image(s)" in result.stdout
    with (exported / "manifest.csv").open() as handle:
        source = list(csv.DictReader(handle))
    with (out / "manifest.csv").open() as handle:
        protected = list(csv.DictReader(handle))
    assert [r["caption"] for r in protected] == [r["caption"] for r in source]
    for before, after in zip(source, protected, strict=True):
        original = load_image_uint8(ImageRef("x", path=exported / before["image"]), "x")
        saved = read_png_uint8(out / after["image"])
        assert saved.shape == original.shape == (3, 64, 64)
        assert linf_levels(original, saved) <= 8
    record = json.loads((out / "mmguard-run.json").read_text())
    assert record["history"][0]["command"][-4:] == ["8/255", "--out", str(out), "--quiet"]


def test_protect_emoji_scenes_keeps_512_px_within_budget(tmp_path):
    from mmguard.data.builtin import emoji, load_builtin

    if not (emoji.FONT.exists() and emoji.EMOJI_TEST.exists()):
        pytest.skip("emoji font or emoji-test.txt not installed")
    out = tmp_path / "p"
    result = mmguard("protect", "--dataset", "emoji-scenes", "--split", "test", "--limit", "4",
                     "--method", "random", "--eps", "8/255", "--out", str(out), "--quiet")
    assert "protected 4 image(s)" in result.stdout
    originals = {r.image.key: r for r in load_builtin("emoji-scenes", "test").records[:4]}
    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["caption"], r["emoji"]) for r in rows] == [
        (r.captions[0], r.raw["emoji"]) for r in originals.values()]
    for row, (key, record) in zip(rows, originals.items(), strict=True):
        saved = read_png_uint8(out / row["image"])
        assert row["image"] == f"images/{key}"
        assert saved.shape == (3, 512, 512)
        assert 0 < linf_levels(load_image_uint8(record.image, key), saved) <= 8


@pytest.mark.parametrize("eps", ["0", "2", "-1/255", "eight"])
def test_budget_out_of_range_is_a_clear_error(tmp_path, eps):
    result = mmguard("protect", "--dataset", "digits", "--method", "random", "--eps", eps,
                     "--out", str(tmp_path / "o"), check=False)
    assert result.returncode != 0
    assert "budget" in result.stderr and eps in result.stderr
    assert not (tmp_path / "o").exists()


def test_bad_items_exit_non_zero_naming_the_item(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "ok.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "manifest.csv").write_text("image,caption\nok.png,fine\nbroken.jpg,bad\n")
    result = mmguard("protect", "--data", str(root / "manifest.csv"), "--method", "random",
                     "--out", str(tmp_path / "o"), check=False)
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and "--skip-bad" in result.stderr
    skipped = mmguard("protect", "--data", str(root / "manifest.csv"), "--method", "random",
                      "--out", str(tmp_path / "o2"), "--skip-bad", "--quiet")
    assert "skipped 1 bad item(s)" in skipped.stdout and "broken.jpg" in skipped.stdout


def test_option_a_method_does_not_use_is_refused(tmp_path):
    result = mmguard("protect", "--dataset", "digits", "--method", "random", "--surrogate", "rn",
                     "--out", str(tmp_path / "o"), check=False)
    assert result.returncode == 1 and "does not use --surrogate" in result.stderr


def _journal_lines(out: Path) -> int:
    journal = out / ".mmguard" / "journal.jsonl"
    return journal.read_text().count("\n") if journal.exists() else 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_without_losing_or_redoing_items(tmp_path, how):
    total = 3000
    out = tmp_path / "out"
    args = ["protect", "--dataset", "fashion-mnist", "--method", "random", "--out", str(out),
            "--limit", str(total), "--quiet"]
    # A test runner started in the background inherits SIGINT ignored, and Python keeps an
    # inherited "ignore"; give the child the default action so Ctrl-C handling is tested.
    process = subprocess.Popen([*MMGUARD, *args], env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while _journal_lines(out) < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=180)  # generous: CI machines may be loaded
    assert process.returncode != 0, "the run finished before it was killed"
    if how == signal.SIGINT:
        assert process.returncode == 130 and "--resume" in stderr
    finished_before = _journal_lines(out)
    assert 100 <= finished_before < total
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino)
              for p in (out / "images").glob("*.png") if not p.name.startswith(".tmp-")}
    # A kill between journaling an item and renaming its file into place loses
    # that one file; the journal entry alone does not count as finished.
    assert len(before) >= finished_before - 1

    refused = mmguard(*args, check=False)  # without --resume the folder is protected
    assert refused.returncode == 1 and "--resume" in refused.stderr
    result = mmguard(*args, "--resume")
    assert f"protected {total} image(s)" in result.stdout
    assert not list((out / "images").glob(".tmp-*")), "temporary files left behind"
    assert len(list((out / "images").glob("*.png"))) == total
    for path, stamp in before.items():
        assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp, f"{path} was rewritten"
    record = json.loads((out / "mmguard-run.json").read_text())
    assert record["status"] == "complete" and record["counts"]["finished"] == total
    assert len({item["key"] for item in record["items"]}) == total
    assert max(item["linf_levels"] for item in record["items"]) <= 8
    # the record's numbers are the files' own: re-measure a sample
    from mmguard.data.builtin import load_builtin

    refs = {ref.key: ref for ref in load_builtin("fashion-mnist", "train").images()[:total]}
    for item in record["items"][:: total // 50]:
        original = load_image_uint8(refs[item["key"]], item["key"])
        assert linf_levels(original, read_png_uint8(out / item["file"])) == item["linf_levels"]
    with (out / "manifest.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == total


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    # The `mmguard demo` command in-process, on the real pretrained LiT, with the
    # recommended method and the demo's three attacker kinds made cheap (one round, one
    # epoch): the full-size demo takes minutes; its timing and figures are in the README.
    import dataclasses

    from click.testing import CliRunner

    from mmguard import demo
    from mmguard.attack.contrastive import AttackerRecipe
    from mmguard.cli import main

    assert demo.METHOD == "wrong-target"  # the recommended method for pairs
    cheap = {**demo.RECOMMENDED.options, "rounds": 2, "pgd_steps": 3, "clean_epochs": 1,
             "retrain_epochs": 1}
    monkeypatch.setattr(demo, "RECOMMENDED", dataclasses.replace(demo.RECOMMENDED,
                                                                 options=cheap))
    attackers = {"linear probe": AttackerRecipe(model="lit", recipe="projection", epochs=1),
                 "fine-tuned": AttackerRecipe(model="lit", recipe="finetune", epochs=1,
                                              lr=1e-4, test_batchnorm=True),
                 "from scratch": AttackerRecipe(model="rn-test", recipe="scratch", epochs=1)}
    monkeypatch.setattr(demo, "ATTACKERS", attackers)
    monkeypatch.setattr(demo, "TEST_PAIRS", 40)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"),
                                       "--limit", "16"])
    assert result.exit_code == 0, result.output
    assert "exported 16 training pairs" in result.output
    assert "--rounds 2" in result.output  # the demo says which setting it runs
    # The budget, re-measured on the saved files, for the release and the control.
    budgets = [int(n) for n in re.findall(r"max \|change\| (\d+)/255", result.output)]
    assert len(budgets) == 2 and all(0 < n <= 8 for n in budgets)
    assert "the clean emoji test split (40 images)" in result.output
    report = (tmp_path / "demo" / "report.md").read_text()
    for row in ("| clean |", "| control: uniform noise, same budget |",
                f"| protected ({demo.METHOD}) |", "| random guess |"):
        assert report.count(row) == len(attackers) and row in result.output
    assert all(attacker in report for attacker in attackers)
    scores = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(scores) == set(attackers) and all(len(rows) == 3 for rows in scores.values())
    # wrong-target releases the original captions: only the images change.
    original = (tmp_path / "demo" / "emoji-train" / "manifest.csv").read_text().splitlines()
    released = (tmp_path / "demo" / "protected" / "manifest.csv").read_text().splitlines()
    assert len(released) == 17
    assert [line.split(",", 1)[1] for line in released] == \
        [line.split(",", 1)[1] for line in original]
    protected = [read_png_uint8(tmp_path / "demo" / "protected" / line.split(",", 1)[0])
                 for line in released[1:4]]
    untouched = [read_png_uint8(tmp_path / "demo" / "emoji-train" / line.split(",", 1)[0])
                 for line in original[1:4]]
    assert any(linf_levels(a, b) > 0 for a, b in zip(protected, untouched, strict=True))


def test_lvlm_demo_runs_end_to_end_on_a_tiny_lvlm(tmp_path, monkeypatch, capsys):
    # The demo's own code path with the tiny random-weight LVLM in place of smolvlm-lite
    # (the real one takes minutes per fine-tune; its timing is in the README).
    from mmguard import demo_lvlm
    from mmguard.attack.lvlm import LVLMRecipe

    monkeypatch.setattr(demo_lvlm, "SURROGATE", "lvlm-test")
    monkeypatch.setattr(demo_lvlm, "ATTACKER", LVLMRecipe(model="lvlm-test", recipe="lora",
                                                          epochs=1, lr=5e-3, batch_size=4))
    monkeypatch.setattr(demo_lvlm, "TEST_IMAGES", 6)
    demo_lvlm.run_lvlm_demo(tmp_path / "demo", limit=8)
    printed = capsys.readouterr().out
    assert "exported 8 training triples" in printed
    assert printed.count("max |change| 8/255 on the saved files") + \
        printed.count("max |change| 7/255 on the saved files") == 2
    report = (tmp_path / "demo" / "report.md").read_text()
    for row in ("| untouched (zero-shot) |", "| fine-tuned on clean |",
                "| control: uniform noise, same budget |",
                f"| fine-tuned on protected ({demo_lvlm.METHOD}) |"):
        assert row in report and row in printed
    scores = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert all(0.0 <= row["exact_match"] <= 100.0 for row in scores.values())


def test_evaluate_reports_clean_protected_random_and_degradation(tmp_path):
    clean, protected = tmp_path / "c", tmp_path / "p"
    mmguard("datasets", "export", "digits", "--out", str(clean), "--limit", "64")
    mmguard("protect", "--data", str(clean / "manifest.csv"), "--method", "random", "--out",
            str(protected), "--quiet")
    result = mmguard("evaluate", "--train", str(protected / "manifest.csv"),
                     "--baseline-train", str(clean / "manifest.csv"), "--test", "digits:test",
                     "--attacker", "rn-test", "--epochs", "2", "--seeds", "0,1",
                     "--augment", "jpeg:90", "--json", str(tmp_path / "r.json"))
    for row in ("| clean |", "| given --train |", "| random guess |"):
        assert row in result.stdout
    assert "degradation of R@10" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["seeds"] == [0, 1] and len(report["protected"]["runs"]) == 2
    assert report["augment"] == "jpeg:90"
    assert report["test"] == {"images": 353, "captions": 353}
    assert report["protected"]["random"]["t2i"]["MedR"] == 177.0
    assert set(report["degradation"]["i2t"]) >= {"R@1", "R@10", "MedR_ratio"}


def test_evaluate_rejects_bad_options_clearly(tmp_path):
    bad = mmguard("evaluate", "--train", "nope.csv", "--test", "digits:test", check=False)
    assert bad.returncode == 1 and "neither an existing manifest" in bad.stderr
    bad = mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                  "--augment", "jpeg:0", check=False)
    assert bad.returncode == 1 and "jpeg" in bad.stderr
    bad = mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                  "--attacker", "lit", "--recipe", "scratch", check=False)
    assert bad.returncode == 1 and "pretrained by construction" in bad.stderr


def test_unknown_attacker_is_a_clear_error_listing_the_known_models():
    result = mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                     "--attacker", "rn-tnyi", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "unknown attacker 'rn-tnyi'" in result.stderr
    assert "rn-tiny" in result.stderr and "lvlm-test" in result.stderr
    assert "see `mmguard models`" in result.stderr


def test_projector_option_is_for_lvlm_attackers():
    assert "--projector" in mmguard("evaluate", "--help").stdout
    align_help = " ".join(mmguard("align", "--help").stdout.split())  # click rewraps it
    assert "mmguard evaluate --attacker NAME --projector PATH" in align_help
    result = mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                     "--attacker", "rn-test", "--projector", __file__, check=False)
    assert result.returncode == 1
    assert "--projector applies to LVLM attackers; rn-test is a contrastive model" in \
        result.stderr


def test_test_batchnorm_is_for_contrastive_attackers():
    result = mmguard("evaluate", "--train", "digits:train", "--test", "digits:test",
                     "--attacker", "lvlm-test", "--test-batchnorm", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--test-batchnorm applies to contrastive attackers; lvlm-test is an LVLM" in \
        result.stderr
