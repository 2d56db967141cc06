"""`mmguard demo --lvlm`: the LVLM path end to end on bundled real data.

1. Export the first images of Fashion-MNIST's training split as VQA triples
   ("What kind of clothing is this?" -> class name), as a data owner's folder.
2. Protect them with the method `mmguard protect` recommends for triples
   (wrong-target: each image's features collide with those of an image with
   another answer on the embedded `smolvlm-lite`'s frozen vision tower; the
   texts stay untouched), and, as the control, with uniform random noise in
   the same budget. Audit both (budget re-measured on the saved 8-bit files,
   sizes, texts).
3. Fine-tune `smolvlm-lite` (LoRA + projector) on the clean copy, on the
   uniform-noise copy and on the protected copy, and ask each the clean test
   questions. The method has no trigger, so its noise-only control is the
   method itself and its trigger-only control is the clean copy.
4. Print exact-match accuracy and the degradation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mmguard.attack.lvlm import LVLMRecipe, build_attacker
from mmguard.attack.triples import load_triples
from mmguard.data.budget import levels
from mmguard.data.builtin import load_builtin
from mmguard.data.export import export_dataset
from mmguard.data.sources import fingerprint, read_dataset
from mmguard.errors import MMGuardError
from mmguard.evaluate.audit import audit_or_raise
from mmguard.evaluate.lvlm_protocol import (
    AnswerEvaluation,
    answer_table,
    evaluate_answers,
    run_lvlm_seeds,
)
from mmguard.evaluate.vqa import reference_levels
from mmguard.protect.recommend import recommended_method
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset

EPS = 8 / 255
DEFAULT_IMAGES = 64
TEST_IMAGES = 100
SURROGATE = "smolvlm-lite"
METHOD = recommended_method("triples").method
ATTACKER = LVLMRecipe(model=SURROGATE, recipe="lora", epochs=8, lr=1e-3, batch_size=8)
EVALUATION = AnswerEvaluation(max_new_tokens=6, attention_examples=0, samples=0)


def run_lvlm_demo(out: Path, limit: int | None = None) -> None:
    if out.exists() and any(out.iterdir()):
        raise MMGuardError(f"{out} is not empty; remove it or pass --out NEW_FOLDER")
    limit = limit or DEFAULT_IMAGES
    started = time.monotonic()
    click.echo(f"mmguard demo --lvlm: protect {limit} Fashion-MNIST question/answer triples "
               f"with {METHOD} (the recommended method) and, as the control, with uniform "
               f"noise, against {SURROGATE} (EfficientNet-Lite0 -> SmolLM2-135M); then "
               "fine-tune it on each copy and ask the clean test questions.")
    originals = out / "fashion-train"
    manifest = export_dataset(load_builtin("fashion-mnist", "train", "triples"), originals,
                              "csv", limit)
    click.echo(f"1. exported {limit} training triples to {manifest}")

    dataset = read_dataset(manifest)
    copies = {}
    for name, folder, method in (
            (METHOD, out / "protected", create_method(METHOD, "triples", eps=EPS, seed=0,
                                                      surrogates=(SURROGATE,))),
            ("uniform", out / "uniform", create_method("random", "triples", eps=EPS, seed=0))):
        summary = protect_dataset(dataset, method, folder, command=["mmguard", "demo", "--lvlm"],
                                  input_fingerprint=fingerprint(dataset), progress=False)
        worst = audit_or_raise(folder).max_linf_levels
        click.echo(f"2. {name}: wrote {folder}: max |change| {worst}/255 on the saved files "
                   f"(budget {levels(EPS)}/255), mean PSNR {summary.mean_psnr_db:.1f} dB, "
                   f"{time.monotonic() - started:.0f} s so far")
        copies[name] = load_triples(read_dataset(folder / "manifest.csv"))

    clean = load_triples(dataset)
    test = load_triples(load_builtin("fashion-mnist", "test", "triples"), TEST_IMAGES)
    rows = {"untouched (zero-shot)": evaluate_answers(build_attacker(ATTACKER), test, clean,
                                                      EVALUATION)}
    for label, train in (("fine-tuned on clean", clean),
                         ("control: uniform noise, same budget", copies["uniform"]),
                         (f"fine-tuned on protected ({METHOD})", copies[METHOD])):
        result = run_lvlm_seeds(train, test, ATTACKER, [0], label, EVALUATION,
                                log=lambda line: click.echo(f"3. attacker {line}"))
        rows[label] = result["runs"][0]
    _, examples = test.inputs()
    table = answer_table(rows, reference_levels([e.response or "" for e in examples]),
                         ("exact_match",), "attacker (smolvlm-lite, LoRA)",
                         clean="fine-tuned on clean")
    click.echo("\n" + table)
    click.echo("\nHow to read it: protection works when the protected row is far below the "
               "clean row and below the uniform-noise control (which shows what any noise of "
               "this size costs). Full results: benchmarks/results/lab-bench.md.")
    (out / "report.md").write_text(table + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    click.echo(f"done in {time.monotonic() - started:.0f} s; report in {out / 'report.md'}")
