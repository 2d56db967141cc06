"""Protect a dataset end to end: validate, run a method, write the output.

    dataset = read_dataset("photos/manifest.csv")
    method = create_method("random", dataset.kind, eps=8 / 255, seed=0)
    summary = protect_dataset(dataset, method, Path("protected"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mmguard.data.images import DecodedImage, check_image_file, load_image, to_float
from mmguard.data.records import Dataset, ImageRef, Record, TripleRecord
from mmguard.data.release import RELEASE_PER, STATE_DIR, output_image_paths, per_caption_images
from mmguard.errors import BadItemError, MMGuardError
from mmguard.protect.base import ProtectionItem, ProtectionMethod
from mmguard.protect.output import ProtectedDatasetWriter

MAX_TEXT_CHARS = 10_000
_MAX_LISTED = 20


@dataclass
class ImageJob:
    """One image to protect, with every text that goes with it."""

    ref: ImageRef
    where: str  # the first record naming this image, for messages
    texts: list[str]
    responses: list[str] | None = None  # triples only, one per text


@dataclass
class RunSummary:
    out_dir: Path
    finished: int
    written_now: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    max_linf_levels: int = 0
    mean_psnr_db: float | None = None


def plan_jobs(dataset: Dataset, limit: int | None,
              max_text_chars: int = MAX_TEXT_CHARS) -> tuple[list[ImageJob], list[tuple[str, str]]]:
    """Group records by image, keep the first `limit` images, and find bad items.

    Returns the good jobs and the problems as (item, reason). Everything here
    is cheap (no full decoding), so a bad row is reported before hours of work.
    """
    problems = [(r.where, r.reason) for r in dataset.rejected]
    groups = dataset.records_by_image()
    keys = list(groups)[:limit] if limit is not None else list(groups)
    paths = output_image_paths(dataset)
    jobs: list[ImageJob] = []
    output_names: dict[str, str] = {}
    for key in keys:
        records = [dataset.records[i] for i in groups[key]]
        where = f"{records[0].where} ({key})"
        text_problems = [problem for record in records
                         for problem in _text_problems(record, max_text_chars)]
        problems.extend(text_problems)
        try:
            # Two images whose protected PNGs would share a path, also on
            # case-insensitive file systems ("a/x.jpg" and "a/X.png").
            name = paths[key].casefold()
            if name in output_names:
                raise BadItemError(where, f"its output file {paths[key]} would be the same as "
                                          f"that of {output_names[name]}")
            output_names[name] = where
            _check_image_header(records[0].image, where)
        except BadItemError as exc:
            problems.append((exc.item, exc.reason))
            continue
        if not text_problems:
            responses = [record.response for record in records
                         if isinstance(record, TripleRecord)] or None
            jobs.append(ImageJob(records[0].image, where,
                                 [text for record in records for text in record.texts()],
                                 responses))
    return jobs, problems


def _text_problems(record: Record, max_text_chars: int) -> list[tuple[str, str]]:
    item = f"{record.where} ({record.image.key})"
    named = record.named_texts()
    if not named:
        return [(item, "no caption")]
    problems = []
    for name, text in named:
        if not text.strip():
            problems.append((item, f"empty {name}"))
        elif len(text) > max_text_chars:
            problems.append((item, f"{name} is {len(text):,} characters, over the "
                                   f"{max_text_chars:,} limit"))
    return problems


def _check_image_header(ref: ImageRef, where: str) -> None:
    check_image_file(ref, where)
    if ref.path is None:
        return
    try:
        with Image.open(ref.path) as handle:
            handle.size  # noqa: B018 - reading the header is the check
    except UnidentifiedImageError:
        raise BadItemError(where, "not a recognised image format (Pillow cannot identify "
                                  f"{ref.path.name})") from None
    except OSError as exc:
        raise BadItemError(where, f"cannot read image: {exc}") from None


def format_problems(problems: list[tuple[str, str]]) -> str:
    lines = [f"  {item}: {reason}" for item, reason in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    return "\n".join(lines)


def protect_dataset(dataset: Dataset, method: ProtectionMethod, out_dir: Path, *,
                    limit: int | None = None, skip_bad: bool = False, resume: bool = False,
                    command: list[str] | None = None, progress: bool = True,
                    input_fingerprint: dict | None = None,
                    batch_size: int | None = None) -> RunSummary:
    """Validate, run `method` over the dataset and write the protected copy to `out_dir`.

    `batch_size` (images decoded and protected at once) defaults to the method's
    own; outputs never depend on it. A method that protects per caption row sees,
    and `limit` counts, one image per row.
    """
    if dataset.kind not in method.kinds:
        raise MMGuardError(f"method {method.name!r} protects {' or '.join(method.kinds)}, but "
                           f"{dataset.source} holds {dataset.kind}")
    if method.kind != dataset.kind:
        raise MMGuardError(f"the {method.name} method was set up for {method.kind}, but "
                           f"{dataset.source} holds {dataset.kind}; create it with "
                           f"kind={dataset.kind!r}")
    per_caption = method.release_per == "caption"
    if per_caption:
        dataset = per_caption_images(dataset)
    jobs, problems = plan_jobs(dataset, limit)
    if problems and not skip_bad:
        raise MMGuardError(f"{len(problems)} bad item(s) in {dataset.source}; nothing was "
                           f"written. Fix them or add --skip-bad:\n{format_problems(problems)}")
    config = {**(input_fingerprint or {"input": dataset.source}), "kind": dataset.kind,
              **method.describe(), "limit": limit, "skip_bad": skip_bad,
              # Only when it differs, so image-mode run records keep their form.
              **({RELEASE_PER: "caption"} if per_caption else {})}
    writer = ProtectedDatasetWriter(out_dir, dataset, config, command or [], resume,
                                    method.trigger_position)
    for item, reason in problems:
        writer.skip_item(item, item, reason)
    pending = [job.ref.key for job in jobs if not writer.is_finished(job.ref.key)]
    batch_size = max(1, batch_size or method.batch_size)
    view = _JobsView(jobs, writer, skip_bad)
    written = 0
    status, error = "complete", None
    try:
        method.prepare(view, out_dir / STATE_DIR / "work")
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), unit="img",
                   desc=f"protect ({method.name})", disable=not progress, dynamic_ncols=True)
        with bar:
            for start in range(0, len(pending), batch_size):
                keys = pending[start:start + batch_size]
                loaded = view.load_with_originals(keys)
                batch = [item for item, _ in loaded]
                results = method.protect_batch(batch) if batch else []
                for (item, original), result in zip(loaded, results, strict=True):
                    writer.write_item(item.key, original, result.image, result.trigger)
                    written += 1
                bar.update(len(keys))
    except BadItemError as exc:
        status, error = "failed", str(exc)
        raise MMGuardError(
            f"{exc}\n{len(writer.finished)} item(s) finished before this are kept in {out_dir}; "
            "fix the item or add --skip-bad, then continue with --resume") from None
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the user"
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        writer.close(status, error, method.report())
    finished = list(writer.finished.values())
    psnrs = [i.psnr_db for i in finished if i.psnr_db != float("inf")]
    return RunSummary(
        out_dir=out_dir, finished=len(finished), written_now=written,
        skipped=[(v["item"], v["reason"]) for v in writer.skipped.values()],
        max_linf_levels=max((i.linf_levels for i in finished), default=0),
        mean_psnr_db=sum(psnrs) / len(psnrs) if psnrs else None)


class _JobsView:
    """The DatasetView a method's `prepare` sees: every good image, loaded on demand."""

    def __init__(self, jobs: list[ImageJob], writer: ProtectedDatasetWriter, skip_bad: bool):
        self._jobs = {job.ref.key: job for job in jobs}
        self._writer = writer
        self._skip_bad = skip_bad
        self.keys = list(self._jobs)
        self.texts = {key: job.texts for key, job in self._jobs.items()}

    def load(self, keys: Sequence[str]) -> list[ProtectionItem]:
        return [item for item, _ in self.load_with_originals(keys)]

    def load_with_originals(self, keys: Sequence[str]
                            ) -> list[tuple[ProtectionItem, DecodedImage]]:
        """Float items plus their decoded originals; a bad image is skipped or stops the run."""
        loaded = []
        for key in keys:
            job = self._jobs[key]
            try:
                original = load_image(job.ref, job.where)
            except BadItemError as exc:
                if not self._skip_bad:
                    raise
                self._writer.skip_item(key, exc.item, exc.reason)
                continue
            # Methods see the composited RGB image; the writer keeps any alpha.
            loaded.append((ProtectionItem(key, to_float(original.rgb), job.texts, job.responses),
                           original))
        return loaded
