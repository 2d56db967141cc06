"""The `mmguard` command line: protect, evaluate, datasets, demo."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from mmguard import __version__
from mmguard.data.builtin import BUILTINS, SPLITS, load_builtin
from mmguard.data.export import FORMATS, export_dataset
from mmguard.data.records import KINDS, Dataset
from mmguard.data.sources import fingerprint, read_dataset
from mmguard.errors import MMGuardError
from mmguard.protect.base import MethodSettings
from mmguard.protect.budget import levels, parse_eps
from mmguard.protect.registry import METHODS, create_method
from mmguard.protect.run import RunSummary, protect_dataset

# Options of `protect` that are method settings; used to tell the method which
# ones the user set, so a method can refuse options it would ignore.
_METHOD_OPTIONS = {"batch_size": "batch_size", "device": "device", "surrogate": "surrogates",
                   "trigger_len": "trigger_len"}


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
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per optimisation batch (model-based methods).")
@click.option("--device", default="cpu", show_default=True,
              help="Torch device for model-based methods, e.g. cuda or cuda:1.")
@click.option("--surrogate", multiple=True,
              help="Surrogate model name (repeat for an ensemble; model-based methods).")
@click.option("--trigger-len", type=click.IntRange(min=1, max=32), default=None,
              help="Text trigger length in tokens (methods with a trigger).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def protect(ctx, data, dataset_name, split, kind, method, eps, out, limit, seed, resume,
            skip_bad, batch_size, device, surrogate, trigger_len, quiet):
    """Protect a dataset: perturb its images (and add a text trigger if the method uses
    one) and write the protected copy, with a run record, to --out.

    \b
    Examples:
      mmguard protect --dataset emoji --method random --out protected/
      mmguard protect --data photos/manifest.csv --method random --eps 8/255 --out out/
    """
    dataset = load_input(data, dataset_name,
                         split, "pairs" if dataset_name and kind == "auto" else kind)
    given = frozenset(setting for option, setting in _METHOD_OPTIONS.items()
                      if ctx.get_parameter_source(option) == ParameterSource.COMMANDLINE)
    settings = MethodSettings(eps=eps, seed=seed, device=device, batch_size=batch_size,
                              surrogates=tuple(surrogate), trigger_len=trigger_len)
    protection = create_method(method, settings, given)
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
@click.option("--train", type=click.Path(path_type=Path), required=True,
              help="Training manifest for the attacker (protected or clean).")
@click.option("--test", type=click.Path(path_type=Path), required=True,
              help="Clean test manifest.")
@click.option("--attacker", required=True, help="Attacker model name from the registry.")
@click.option("--recipe", type=click.Choice(("scratch", "finetune", "projection", "lora")),
              default="scratch", show_default=True, help="How the attacker trains.")
@click.option("--baseline-train", type=click.Path(path_type=Path),
              help="Clean training manifest: also train a clean attacker and report degradation.")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--augment", default=None, help="Attacker-side transformations, e.g. jpeg:75.")
@click.option("--mix-clean", default=None, help="MANIFEST:FRACTION of clean data mixed in.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def evaluate(**options):
    """Train an attacker on --train and measure it on the clean --test set."""
    raise MMGuardError("attacker training and retrieval/answer evaluation are not built yet; "
                       "`mmguard protect` works today with --method random")


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
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only the first N training images.")
def demo(out, limit):
    """Run the main job on the bundled emoji data: export, protect, check the budget."""
    from mmguard.demo import run_demo

    run_demo(out, limit)
