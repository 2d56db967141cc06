"""`mmguard demo --lvlm`: the LVLM path end to end on bundled real data.

1. Export the first images of Fashion-MNIST's training split as VQA triples
   ("What kind of clothing is this?" -> class name), as a data owner's folder.
2. Protect them with MMGuard (image noise + a 3-token trigger inserted at the
   end of the prompt, Bridge Path Hijack binding) against the embedded
   `smolvlm-lite` LVLM, and audit the result (budget re-measured on the saved
   8-bit files, sizes, texts).
3. Fine-tune `smolvlm-lite` (LoRA + projector) on the clean copy, on the
   protected copy and on the clean images with the protected prompts (the
   trigger-only control), and ask each the clean test questions.
4. Print exact-match accuracy, the degradation, and the attention TV distance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mmguard.attack.lvlm import LVLMRecipe, build_attacker
from mmguard.attack.triples import TripleSet, load_triples
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
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset

EPS = 8 / 255
DEFAULT_IMAGES = 64
TEST_IMAGES = 100
SURROGATE = "smolvlm-lite"
MMGUARD_SETTINGS = dict(eps=EPS, seed=0, surrogates=(SURROGATE,), binding="bph", rounds=2,
                        pgd_steps=6, top_k=4, batch_size=8)
ATTACKER = LVLMRecipe(model=SURROGATE, recipe="lora", epochs=8, lr=1e-3, batch_size=8)
EVALUATION = AnswerEvaluation(max_new_tokens=6, attention_examples=32)


def run_lvlm_demo(out: Path, limit: int | None = None) -> None:
    if out.exists() and any(out.iterdir()):
        raise MMGuardError(f"{out} is not empty; remove it or pass --out NEW_FOLDER")
    limit = limit or DEFAULT_IMAGES
    started = time.monotonic()
    click.echo(f"mmguard demo --lvlm: protect {limit} Fashion-MNIST question/answer triples "
               f"with MMGuard against {SURROGATE} (EfficientNet-Lite0 -> SmolLM2-135M), then "
               "fine-tune it on clean and on protected copies and ask the clean test "
               "questions. About 15 minutes on 2 CPU cores.")
    originals = out / "fashion-train"
    manifest = export_dataset(load_builtin("fashion-mnist", "train", "triples"), originals,
                              "csv", limit)
    click.echo(f"1. exported {limit} training triples to {manifest}")

    dataset = read_dataset(manifest)
    method = create_method("mmguard", "triples", **MMGUARD_SETTINGS)
    protected_dir = out / "protected"
    summary = protect_dataset(dataset, method, protected_dir, command=["mmguard", "demo",
                                                                       "--lvlm"],
                              input_fingerprint=fingerprint(dataset))
    worst = audit_or_raise(protected_dir).max_linf_levels
    click.echo(f"2. protected them into {protected_dir}: max |change| "
               f"{worst}/255 on the saved files (budget {levels(EPS)}/255), "
               f"mean PSNR {summary.mean_psnr_db:.1f} dB, {time.monotonic() - started:.0f} s "
               "so far")
    protected_data = read_dataset(protected_dir / "manifest.csv")
    click.echo(f"   e.g. the prompt now reads: {protected_data.records[0].prompt!r}")

    clean = load_triples(dataset)
    protected = load_triples(protected_data)
    test = load_triples(load_builtin("fashion-mnist", "test", "triples"), TEST_IMAGES)
    rows = {"untouched (zero-shot)": evaluate_answers(build_attacker(ATTACKER), test, clean,
                                                      EVALUATION)}
    for label, train in (("fine-tuned on clean", clean),
                         ("fine-tuned on protected (MMGuard)", protected),
                         ("control: triggers only", TripleSet(clean.images, protected.turns,
                                                              clean.keys))):
        result = run_lvlm_seeds(train, test, ATTACKER, [0], label, EVALUATION,
                                log=lambda line: click.echo(f"3. attacker {line}"))
        rows[label] = result["runs"][0]
    _, examples = test.inputs()
    table = answer_table(rows, reference_levels([e.response or "" for e in examples]),
                         ("exact_match", "tv_distance"), "attacker (smolvlm-lite, LoRA)",
                         clean="fine-tuned on clean")
    click.echo("\n" + table)
    click.echo("\nHow to read it: protection works when the protected row is far below the "
               "clean row, near the zero-shot row, and below the triggers-only control. "
               "Full results: docs/benchmarks/lvlm.md.")
    (out / "report.md").write_text(table + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    click.echo(f"done in {time.monotonic() - started:.0f} s; report in {out / 'report.md'}")
