"""The `mmguard` command line: protect, evaluate, datasets, demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from mmguard import __version__
from mmguard.attack.contrastive import RECIPES
from mmguard.attack.lvlm import LVLM_RECIPES
from mmguard.data.builtin import BUILTINS, SPLITS, load_builtin
from mmguard.data.export import FORMATS, export_dataset
from mmguard.data.records import KINDS, Dataset
from mmguard.data.sources import fingerprint, read_dataset
from mmguard.errors import MMGuardError
from mmguard.protect.base import MethodSettings
from mmguard.protect.budget import levels, parse_eps
from mmguard.protect.registry import METHODS, create_method
from mmguard.protect.run import RunSummary, protect_dataset

# CLI option names that differ from their MethodSettings field.
_SETTING_NAMES = {"surrogate": "surrogates"}


class EpsParam(click.ParamType):
    name = "EPS"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_eps(value)
        except MMGuardError as exc:
            self.fail(str(exc), param, ctx)


class _Group(click.Group):
    """Turns user errors into `error: ...` and exit code 1, Ctrl-C into 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MMGuardError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; finished items are kept, continue with --resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmguard")
def main():
    """Make image-text data unlearnable for vision-language models, and measure it."""


def load_input(data: Path | None, dataset_name: str | None, split: str | None,
               kind: str) -> Dataset:
    if (data is None) == (dataset_name is None):
        raise MMGuardError("give exactly one input: --data MANIFEST or --dataset NAME")
    if dataset_name is not None:
        return load_builtin(dataset_name, split or "train", kind)
    dataset = read_dataset(data, split)
    if kind != dataset.kind and kind != "auto":
        raise MMGuardError(f"{data} holds {dataset.kind}, not {kind}")
    return dataset


@main.command()
@click.option("--data", type=click.Path(path_type=Path),
              help="Input manifest: CSV/JSONL with image,caption or image,prompt,response "
                   "columns, LLaVA conversation JSON, or a Hugging Face datasets folder.")
@click.option("--dataset", "dataset_name", type=click.Choice(sorted(BUILTINS)),
              help="A built-in dataset instead of --data (see `mmguard datasets list`).")
@click.option("--split", default=None,
              help="Split of a built-in dataset (train or test; default train) or of a "
                   "Hugging Face DatasetDict.")
@click.option("--kind", type=click.Choice(("auto",) + KINDS), default="auto", show_default=True,
              help="Pairs (image, caption) or triples (image, prompt, response); built-in "
                   "datasets give either, manifests say which they hold.")
@click.option("--method", type=click.Choice(sorted(METHODS)), required=True,
              help="Protection method: " + "; ".join(f"{n}: {c.summary}"
                                                    for n, c in sorted(METHODS.items())))
@click.option("--eps", type=EpsParam(), default="8/255", show_default=True,
              help="L-infinity budget on pixels in [0,1], as 8/255 or 0.0314; it holds on the "
                   "saved 8-bit files.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: new or empty, or one an earlier run wrote (with --resume). "
                   "Never the input's folder or inside it.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Protect only the first N images.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed and input give byte-identical output.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out: finished items are kept, not redone.")
@click.option("--skip-bad", is_flag=True,
              help="Skip bad items (listed with their reason in mmguard-run.json) instead of "
                   "stopping at the first one.")
@click.option("--surrogate", multiple=True,
              help="Surrogate model name (see `mmguard models`); model-based methods. mmguard "
                   "takes it several times for an ensemble.")
@click.option("--surrogate-pretrained", default=None,
              help="Pretrained weights for the surrogate (open_clip tag or checkpoint path).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None,
              help="Images per optimisation batch [method default: 16].")
@click.option("--device", default=None, help="Torch device, e.g. cuda or cuda:1 [cpu].")
@click.option("--trigger-len", type=click.IntRange(min=1, max=32), default=None,
              help="Text trigger length in tokens [mem: 3].")
@click.option("--natural-triggers", is_flag=True, default=None,
              help="Triggers of real English words only (MEM section 4.4).")
@click.option("--trigger-vocab", type=click.IntRange(min=1), default=None,
              help="Draw trigger words from a fixed random subset of this many words "
                   "(mmguard extension; MEM uses the whole vocabulary).")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help="Outer rounds of bilevel optimisation [10].")
@click.option("--pgd-steps", type=click.IntRange(min=1), default=None,
              help="PGD steps per batch and round [8].")
@click.option("--step-size", type=EpsParam(), default=None, help="PGD step size [1/255].")
@click.option("--train-steps", type=click.IntRange(min=0), default=None,
              help="Surrogate training steps per batch and round [1].")
@click.option("--surrogate-lr", type=float, default=None, help="Surrogate learning rate [1e-4].")
@click.option("--surrogate-bn", type=click.Choice(("running", "batch")), default=None,
              help="BatchNorm statistics while optimising noise and triggers: the surrogate's "
                   "running ones, or each batch's own, as an attacker trains [running].")
@click.option("--clean-epochs", type=click.IntRange(min=0), default=None,
              help="uap: clean surrogate training epochs [10].")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="HotFlip candidates per trigger position [16].")
@click.option("--beam-width", type=click.IntRange(min=1), default=None,
              help="Beam width of the trigger search [1].")
@click.option("--trigger-rounds", type=click.IntRange(min=0), default=None,
              help="Update triggers only in the first N rounds [half of --rounds].")
@click.option("--stop-loss", type=float, default=None,
              help="Stop when the mean training loss on protected data is below this [0.01].")
@click.option("--binding", type=click.Choice(("bph", "crs", "none")), default=None,
              help="mmguard: cross-modal binding disruption, Bridge Path Hijack or Contrastive "
                   "Routing Shift [bph].")
@click.option("--binding-weight", type=click.FloatRange(min=0), default=None,
              help="mmguard: weight of the binding loss [0.5].")
@click.option("--components", type=click.Choice(("image+text", "image", "text")), default=None,
              help="mmguard: perturb the image, insert a trigger, or both [image+text].")
@click.option("--trigger-position", default=None,
              help="mmguard: where the trigger goes in the prompt: start, end or a word index "
                   "[end].")
@click.option("--trigger-groups", type=click.Choice(("item", "response")), default=None,
              help="mmguard: one trigger per item (the paper), or one shared by all items "
                   "whose responses are the same [item].")
@click.option("--noise-groups", type=click.Choice(("item", "response")), default=None,
              help="mmguard: one noise pattern per image (the paper), or one shared by all "
                   "images whose responses are the same (images of one size) [item].")
@click.option("--bilevel", is_flag=True, default=None,
              help="mmguard: train the surrogates' projectors on the protected data between "
                   "perturbation updates.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def protect(data, dataset_name, split, kind, method, eps, out, limit, seed, resume, skip_bad,
            quiet, **method_options):
    """Protect a dataset: perturb its images (and add a text trigger if the method uses
    one) and write the protected copy, with a run record, to --out.

    Method options left out take the method's defaults (in brackets).

    \b
    Examples:
      mmguard protect --dataset emoji --method mem --trigger-len 5 --out protected/
      mmguard protect --data photos/manifest.csv --method random --eps 8/255 --out out/
    """
    if dataset_name and kind == "auto":
        kind = METHODS[method].kinds[0]
    dataset = load_input(data, dataset_name, split, kind)
    given = {_SETTING_NAMES.get(option, option): value
             for option, value in method_options.items() if value not in (None, ())}
    if "surrogates" in given:
        given["surrogates"] = tuple(given["surrogates"])
    settings = MethodSettings(eps=eps, seed=seed, **given)
    protection = create_method(method, settings, frozenset(given))
    identity = ({"input": dataset.source} if dataset_name else fingerprint(dataset))
    started = time.monotonic()
    summary = protect_dataset(dataset, protection, out, limit=limit, skip_bad=skip_bad,
                              resume=resume, command=sys.argv, progress=not quiet,
                              input_fingerprint=identity)
    _print_summary(summary, eps, time.monotonic() - started)


def _print_summary(summary: RunSummary, eps: float, seconds: float) -> None:
    psnr = f"{summary.mean_psnr_db:.2f} dB" if summary.mean_psnr_db is not None else "n/a"
    click.echo(f"protected {summary.finished} image(s) in {summary.out_dir} "
               f"({summary.written_now} written now, {seconds:.1f} s); "
               f"max L-inf {summary.max_linf_levels}/255 (budget {levels(eps)}/255), "
               f"mean PSNR {psnr}")
    if summary.skipped:
        click.echo(f"skipped {len(summary.skipped)} bad item(s), listed in mmguard-run.json:")
        for item, reason in summary.skipped[:10]:
            click.echo(f"  {item}: {reason}")


@main.command()
@click.option("--train", required=True,
              help="Attacker's training data: a manifest (e.g. a protected folder's) or "
                   "NAME:SPLIT of a built-in dataset.")
@click.option("--test", required=True, help="Clean test data, e.g. emoji:test.")
@click.option("--attacker", default=None,
              help="Attacker model: a contrastive model for image-caption pairs [rn-tiny] or an "
                   "LVLM for (image, prompt, response) triples [smolvlm-lite], e.g. lvlm-test. "
                   "Built-in NAME:SPLIT data is read as pairs or triples to fit it.")
@click.option("--recipe", type=click.Choice(RECIPES + LVLM_RECIPES), default=None,
              help="Contrastive: scratch (random init) [default], finetune (from --pretrained), "
                   "projection (heads only). LVLM: lora (LoRA on the language model plus the "
                   "projector) [default], projector (connector only), full.")
@click.option("--pretrained", default=None,
              help="Contrastive attacker's starting weights (finetune).")
@click.option("--baseline-train", default=None,
              help="Clean training data: also train a clean attacker and report degradation.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs [contrastive 30, LVLM 3].")
@click.option("--lr", type=float, default=None,
              help="Peak learning rate [contrastive 5e-4; LVLM lora 2e-4, projector 1e-3, "
                   "full 2e-5].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Training batch size [contrastive 64 (at least 2), LVLM 8].")
@click.option("--augment", default=None,
              help="Attacker-side transformations applied to training images each epoch, "
                   "e.g. jpeg:75, resize:0.5, grayscale, crop-flip, blur:1 (comma-separated).")
@click.option("--mix-clean", default=None,
              help="CLEAN_MANIFEST:FRACTION: replace this fraction of the training images by "
                   "their clean originals (partial protection).")
@click.option("--strip-rare-words", default=None,
              help="Adaptive attacker: before training, delete words found in fewer than N "
                   "training texts (N >= 2; captions, or prompts of triples), or in fewer than "
                   "a fraction F in (0, 1) of them. Applied to --baseline-train too.")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated attacker seeds; results report mean and spread.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None,
              help="LVLM: first N training images only (each training set).")
@click.option("--limit-test", type=click.IntRange(min=1), default=None,
              help="LVLM: first N test images only.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="LVLM: longest generated answer, in tokens [16].")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None,
              help="LVLM lora recipe: LoRA rank (alpha is twice the rank) [8].")
@click.option("--projector", type=click.Path(path_type=str, exists=True, dir_okay=False),
              default=None,
              help="LVLM: the attacker's projector weights, e.g. from `mmguard align` "
                   "[the packaged aligned projector]. Embedded LVLMs only.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the full report (per seed, mean, std, reference levels) here.")
def evaluate(seeds, json_out, **options):
    """Train an attacker on --train and measure it on the clean --test set: retrieval for
    image-caption pairs, answer accuracy for instruction triples.

    \b
    Examples (does protection work?):
      mmguard evaluate --train protected/manifest.csv --baseline-train emoji:train \\
          --test emoji:test --attacker rn-tiny --seeds 0,1,2
      mmguard evaluate --train protected/manifest.csv --baseline-train digits:train \\
          --test digits:test --attacker smolvlm-lite --recipe lora --epochs 2
    """
    from mmguard.evaluate.attacker import AttackerEvaluation, evaluate_attacker

    spec = AttackerEvaluation(seeds=_parse_seeds(seeds), command=sys.argv, **options)
    result = evaluate_attacker(spec, log=lambda line: click.echo(line, err=True))
    click.echo(result.table)
    if result.summary:
        click.echo(result.summary)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.report, indent=1, default=str) + "\n")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MMGuardError(f"--seeds {text!r}: expected comma-separated integers") from None
    if not seeds:
        raise MMGuardError("--seeds needs at least one seed")
    return seeds


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option("--original", default=None,
              help="The unprotected data (manifest or NAME:SPLIT) [the run record's input].")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the full report here.")
def audit(folder, original, json_out):
    """Check a protected FOLDER against its originals before you publish it.

    Reads every saved image and its original: the file decodes, keeps the
    original's size and stays within the budget; reports PSNR and SSIM; checks
    each text is the original with at most its trigger inserted. Exits 1 and
    names every bad item if anything fails.
    """
    from mmguard.evaluate.audit import audit_folder

    if not folder.is_dir():
        raise MMGuardError(f"{folder} is not a folder")
    report = audit_folder(folder, original)
    click.echo(f"{folder} against {report.original}:")
    click.echo(report.table())
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if not report.ok:
        raise MMGuardError(report.describe_problems()
                           + ("" if len(report.problems) <= 20 else " (see --json)"))
    click.echo("ok: every file within budget, at original size, texts intact")


@main.command("models")
def models_list():
    """List the surrogate/attacker models by name."""
    from mmguard.models.families import model_names

    titles = {"contrastive": "Contrastive (CLIP-style; methods em, uap, mem; pairs):",
              "lvlm": "Generative LVLMs (method mmguard; triples):"}
    for family, names in model_names().items():
        click.echo(titles[family])
        for name, description in names.items():
            click.echo(f"  {name:16s} {description}")


@main.group(cls=_Group)
def datasets():
    """List and export the built-in real datasets."""


@datasets.command("list")
def datasets_list():
    """Show the built-in datasets, their sizes and where they come from."""
    for name, spec in BUILTINS.items():
        click.echo(f"{name:14s} {spec.description}")
        click.echo(f"{'':14s} source: {spec.source}; triples prompt: {spec.prompt!r}")


@datasets.command("export")
@click.argument("name", type=click.Choice(sorted(BUILTINS)))
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@click.option("--kind", type=click.Choice(KINDS), default="pairs", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True,
              help="Manifest format (llava needs --kind triples).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New or empty folder for images/ and the manifest.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images only.")
def datasets_export(name, split, kind, fmt, out, limit):
    """Write a built-in dataset as PNG images plus a manifest."""
    manifest = export_dataset(load_builtin(name, split, kind), out, fmt, limit)
    click.echo(f"wrote {manifest}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for the demo's files (must be new or empty).")
@click.option("--limit", type=click.IntRange(min=16), default=None,
              help="Training images to protect [600; with --lvlm 64].")
@click.option("--lvlm", is_flag=True,
              help="The LVLM path instead: MMGuard on Fashion-MNIST question/answer triples "
                   "against the embedded smolvlm-lite, with LoRA fine-tuned attackers.")
def demo(out, limit, lvlm):
    """The main job on bundled real data: protect emoji pairs with MEM, then train clean and
    protected attackers and compare retrieval on clean test data (--lvlm: MMGuard on VQA
    triples and fine-tuned LVLMs)."""
    if lvlm:
        from mmguard.demo_lvlm import run_lvlm_demo

        run_lvlm_demo(out, limit)
        return
    from mmguard.demo import run_demo

    run_demo(out, limit)


@main.command()
@click.option("--model", "model_name", default="smolvlm-lite", show_default=True,
              help="Embedded LVLM whose projector to align (see `mmguard models`).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Projector weights to write (.safetensors; a .json log goes beside it).")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", "sources", default="emoji,digits", show_default=True,
              help="Built-in datasets whose training captions to align on.")
def align(model_name, out, steps, batch_size, lr, seed, sources):
    """Stage-1 alignment: train an embedded LVLM's projector on public captions.

    mmguard ships aligned projectors; this reproduces them (or aligns on other data).
    Use the result as an attacker's projector: mmguard evaluate --attacker NAME --projector PATH.
    """
    from mmguard.models.lvlm.align import AlignSettings, align_projector
    from mmguard.models.lvlm.embedded import EMBEDDED_SPECS, create_embedded

    if model_name not in EMBEDDED_SPECS:
        raise MMGuardError(f"--model {model_name!r}: only the embedded LVLMs are aligned here "
                           f"({', '.join(EMBEDDED_SPECS)})")
    names = tuple(name.strip() for name in sources.split(",") if name.strip())
    unknown = [name for name in names if name not in BUILTINS]
    if unknown or not names:
        raise MMGuardError(f"--data {sources!r}: built-in datasets are {', '.join(BUILTINS)}")
    adapter = create_embedded(model_name, seed=seed, aligned=False)
    record = align_projector(adapter, AlignSettings(steps, batch_size, lr, seed=seed,
                                                    sources=names), out, log=click.echo)
    click.echo(f"wrote {out} ({record['seconds']:.0f} s, final loss "
               f"{sum(record['loss'][-20:]) / len(record['loss'][-20:]):.3f})")
