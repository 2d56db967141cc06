"""The `mmguard` command line: protect, evaluate, datasets, demo."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

from mmguard import __version__
from mmguard.attack.contrastive import RECIPES
from mmguard.attack.lvlm import LVLM_RECIPES
from mmguard.data.budget import as_levels, levels, parse_eps
from mmguard.data.builtin import BUILTINS, SPLITS, load_builtin
from mmguard.data.export import FORMATS, export_dataset
from mmguard.data.records import KINDS, Dataset
from mmguard.data.resolve import resolve_dataset
from mmguard.data.sources import fingerprint
from mmguard.errors import MMGuardError
from mmguard.protect.base import MethodConfig
from mmguard.protect.recommend import (
    RECOMMENDED,
    STRENGTHS,
    apply_strength,
    recommended_method,
    size_strength,
)
from mmguard.protect.registry import METHODS, create_method
from mmguard.protect.run import RunSummary, protect_dataset


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


def method_options(command):
    """One option per field of the methods' configs (eps and seed have their own).

    The help shows each method's default, read from its Config: the configs are
    the one place defaults live. Options left out take the chosen method's
    defaults; an option the chosen method does not have is an error.
    """
    options: dict[str, tuple[dataclasses.Field, dict[str, object]]] = {}
    for name, cls in METHODS.items():
        for field in dataclasses.fields(cls.Config):
            if field.name not in {f.name for f in dataclasses.fields(MethodConfig)}:
                options.setdefault(field.name, (field, {}))[1][name] = field.default
    for name, (field, defaults) in reversed(list(options.items())):
        meta = field.metadata
        shown = {_show_default(value) for value in defaults.values()}
        where = (f"[{shown.pop()}]" if len(shown) == 1 else
                 "[" + "; ".join(f"{m} {_show_default(v)}" for m, v in defaults.items()) + "]")
        kwargs: dict = {"default": None, "help": f"{meta['help']} {where} ({', '.join(defaults)})"}
        if meta.get("flag"):
            kwargs["is_flag"] = True
        elif meta.get("multiple"):
            kwargs.update(multiple=True, default=())
        else:
            kwargs["type"] = _click_type(field)
        flag = "--" + meta.get("cli", name).replace("_", "-")
        command = click.option(flag, name, **kwargs)(command)
    return command


def _show_default(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and as_levels(value):
        return as_levels(value)
    if isinstance(value, tuple):
        return ",".join(value) or "unset"
    return str(value)


def _click_type(field: dataclasses.Field) -> click.ParamType:
    meta = field.metadata
    if "choices" in meta:
        return click.Choice(meta["choices"])
    if meta.get("type") == "eps":
        return EpsParam()
    base = meta.get("type") or type(field.default)
    bounded = "min" in meta or "max" in meta
    if base is int:
        return click.IntRange(min=meta.get("min"), max=meta.get("max")) if bounded else click.INT
    if base is float:
        return (click.FloatRange(min=meta.get("min"), max=meta.get("max")) if bounded
                else click.FLOAT)
    return click.STRING


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmguard")
def main():
    """Make image-text data unlearnable for vision-language models, and measure it."""


def load_input(data: Path | None, dataset_name: str | None, split: str | None,
               kind: str) -> Dataset:
    if (data is None) == (dataset_name is None):
        raise MMGuardError("give exactly one input: --data MANIFEST or --dataset NAME")
    if dataset_name is not None:
        return resolve_dataset(f"{dataset_name}:{split or 'train'}", kind)
    dataset = resolve_dataset(data, kind, split)
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
@click.option("--method", type=click.Choice(sorted(METHODS)), default=None,
              help="Protection method [the best measured one for the data kind: "
                   + "; ".join(f"{kind} {r.method}" for kind, r in RECOMMENDED.items())
                   + "]: " + "; ".join(f"{n}: {c.summary}" for n, c in sorted(METHODS.items())))
@click.option("--strength", type=click.Choice(tuple(STRENGTHS)), default=None,
              help="Preset of budget and effort: "
                   + "; ".join(f"{name} {levels(s.eps)}/255 with {s.effort:g}x the method's "
                               "PGD steps" for name, s in STRENGTHS.items())
                   + " [mid; without --method, "
                   + "; ".join(f"{r.describe_large()} for {kind} whose images' shorter side "
                               f"is {r.large_side} px or more (median)"
                               for kind, r in RECOMMENDED.items() if r.large_strength)
                   + "]. --eps and --pgd-steps given explicitly win.")
@click.option("--eps", type=EpsParam(), default=None,
              help="L-infinity budget on pixels in [0,1], as 8/255 or 0.0314; it holds on the "
                   "saved 8-bit files [8/255, or the --strength preset's].")
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
@method_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def protect(data, dataset_name, split, kind, method, strength, eps, out, limit, seed, resume,
            skip_bad, quiet, **method_options):
    """Protect a dataset: perturb its images (and add a text trigger if the method uses
    one) and write the protected copy, with a run record, to --out.

    Method options left out take the method's defaults (in brackets).

    Without --method, the best measured method for the data kind is used, and named.

    \b
    Examples:
      mmguard protect --data vqa/manifest.jsonl --out protected/
      mmguard protect --dataset emoji --method mem --trigger-len 5 --out protected/
      mmguard protect --data photos/manifest.csv --method random --eps 8/255 --out out/
    """
    if dataset_name and kind == "auto":
        kind = METHODS[method].kinds[0] if method else "pairs"
    dataset = load_input(data, dataset_name, split, kind)
    given = {option: tuple(value) if isinstance(value, tuple | list) else value
             for option, value in method_options.items() if value not in (None, ())}
    recommended: dict = {}
    if method is None:
        chosen = recommended_method(dataset.kind)
        method, recommended = chosen.method, chosen.options
        setting = f" ({chosen.describe_options()})" if chosen.options else ""
        click.echo(f"no --method given: using {method}{setting}, the best measured method "
                   f"for {dataset.kind}: {chosen.evidence}"
                   + (f". Caveat: {chosen.caveat}" if chosen.caveat else ""), err=True)
        large = (size_strength(chosen, dataset.images()[:limit]) if strength is None
                 and eps is None else None)
        if large:
            strength, side = large
            recommended = {**recommended, **chosen.large_options}
            click.echo(f"images of {side} px (median shorter side, at least "
                       f"{chosen.large_side}): using --strength {chosen.describe_large()}: "
                       f"{chosen.large_evidence}. Give --strength or --eps to choose.",
                       err=True)
    eps, given = apply_strength(method, strength, eps, given, base=recommended)
    protection = create_method(method, dataset.kind, eps=eps, seed=seed, **given)
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
@click.option("--test-batchnorm", is_flag=True, default=False,
              help="Adaptive contrastive attacker: score with BatchNorm statistics re-estimated "
                   "on the clean test images (AdaBN), undoing the shift noisy training data "
                   "left in the running ones.")
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


@main.command()
@click.option("--dataset", "dataset_name", type=click.Choice(sorted(BUILTINS)), required=True,
              help="Built-in dataset whose training split is protected.")
@click.option("--kind", type=click.Choice(KINDS), default="pairs", show_default=True)
@click.option("--method", type=click.Choice(sorted(METHODS)), required=True)
@click.option("--set", "options", multiple=True, metavar="OPTION=VALUE",
              help="A method option, named as its config field (e.g. pgd_steps=40); repeatable.")
@click.option("--attacker", "attackers", multiple=True, required=True,
              help="MODEL:RECIPE[:key=value,...], e.g. lit:projection, rn-tiny:scratch, "
                   "smolvlm-lite:lora:epochs=2, lit:finetune:test_batchnorm=1 (scored with "
                   "BatchNorm statistics re-read on the clean test images); repeatable.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--limit", type=click.IntRange(min=4), default=None,
              help="First N images of the training split (before the hold-out).")
@click.option("--holdout", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True,
              help="Share of those images held out, clean, as the validation set.")
@click.option("--on", "evaluate_on", type=click.Choice(("validation", "test")),
              default="validation", show_default=True,
              help="Score attackers on the held-out validation slice (screening) or on the "
                   "test split (the benchmark; never tune on it).")
@click.option("--limit-test", type=click.IntRange(min=2), default=None)
@click.option("--eps", type=EpsParam(), default="8/255", show_default=True)
@click.option("--name", default=None, help="Row name [dataset/method [options]].")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Work folder (protected data; reused by a rerun of the same row).")
@click.option("--results", type=click.Path(path_type=Path), default=None,
              help="JSON file the row is added to, with a Markdown table beside it "
                   "[OUT/lab.json]. Attacker runs on the clean and uniform sets are kept in "
                   "lab-controls.json beside it and reused by rows of the same setting.")
@click.option("--final-epoch-only", is_flag=True,
              help="Score attackers after their last epoch only (faster for LVLMs).")
@click.option("--augment", default=None,
              help="Robustness row: the attackers transform every training set, clean "
                   "included, each epoch, e.g. jpeg:75, resize:0.5, grayscale, blur:1 (see "
                   "`mmguard evaluate --augment`).")
@click.option("--strip-rare-words", default=None,
              help="Robustness row against the adaptive attacker who deletes, from every "
                   "training set, words found in fewer than N of its texts (N >= 2) or in "
                   "fewer than a fraction F in (0, 1) of them.")
@click.option("--no-split-controls", is_flag=True,
              help="Skip the noise-only and trigger-only controls (two attacker runs per "
                   "seed), e.g. for the ablations of a method whose best row has them.")
def lab(dataset_name, kind, method, options, attackers, seeds, limit, holdout, evaluate_on,
        limit_test, eps, name, out, results, final_epoch_only, augment, strip_rare_words,
        no_split_controls):
    """Efficacy lab: protect a slice with a method and test it against every control
    (clean, uniform noise in the same ball, noise only, trigger only) and attacker, over
    seeds; appends a row to a JSON file and a Markdown table.

    \b
    Example (screening on the validation slice):
      mmguard lab --dataset emoji --method wrong-target --set pgd_steps=40 \\
          --attacker lit:projection --attacker rn-tiny:scratch --limit 600 --out runs/lab/wt
    """
    from mmguard.lab import ControlCache, LabSetting, append_row, lab_row_name, run_lab
    from mmguard.protect.registry import parse_options

    setting = LabSetting(dataset=dataset_name, kind=kind, method=method,
                         options=parse_options(method, options), attackers=tuple(attackers),
                         seeds=tuple(_parse_seeds(seeds)), limit=limit, holdout=holdout,
                         evaluate_on=evaluate_on, limit_test=limit_test, eps=eps,
                         augment=augment, strip_rare_words=strip_rare_words,
                         split_controls=not no_split_controls)
    results = results or out / "lab.json"
    row = run_lab(setting, out, log=lambda line: click.echo(line, err=True),
                  every_epoch=not final_epoch_only,
                  cache=ControlCache(results.parent / "lab-controls.json"))
    append_row(results, results.with_suffix(".md"), name or lab_row_name(setting), row)
    click.echo(results.with_suffix(".md").read_text())


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
    width = max(map(len, BUILTINS))
    for name, spec in BUILTINS.items():
        click.echo(f"{name:{width}s} {spec.description}")
        click.echo(f"{'':{width}s} source: {spec.source}; triples prompt: {spec.prompt!r}")


@datasets.command("export")
@click.argument("name", type=click.Choice(sorted(BUILTINS)))
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@click.option("--kind", type=click.Choice(KINDS), default="pairs", show_default=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True,
              help="Manifest format (llava needs --kind triples).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New or empty folder for images/ and the manifest.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images only.")
@click.option("--spread", is_flag=True,
              help="With --limit: N images evenly spaced over the set, not the first N "
                   "(the emoji sets are sorted by category).")
def datasets_export(name, split, kind, fmt, out, limit, spread):
    """Write a built-in dataset as PNG images plus a manifest."""
    if spread and limit is None:
        raise click.UsageError("--spread needs --limit")
    manifest = export_dataset(load_builtin(name, split, kind), out, fmt, limit, spread=spread)
    click.echo(f"wrote {manifest}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for the demo's files (must be new or empty).")
@click.option("--limit", type=click.IntRange(min=16), default=None,
              help="Training images to protect [200; with --lvlm 64].")
@click.option("--lvlm", is_flag=True,
              help="The LVLM path instead: Fashion-MNIST question/answer triples against the "
                   "embedded smolvlm-lite, with LoRA fine-tuned attackers.")
def demo(out, limit, lvlm):
    """The main job on bundled real data: protect emoji pairs with the recommended method and,
    as the control, uniform noise, then train attackers on each copy and compare retrieval on
    clean test data (--lvlm: the same for VQA triples and fine-tuned LVLMs)."""
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
