"""Check a protected folder against its originals, from the files on disk.

    report = audit_folder(Path("protected"))          # originals named in the run record
    report = audit_folder(Path("protected"), original="photos/manifest.csv")

Before publishing, a data owner wants to know what will actually go out. For
every item the run record lists, this reads the saved PNG and the original
image and checks that the file exists and decodes, has the original's size,
keeps the original's alpha channel byte for byte (or has none, for an opaque
original), and stays within the record's budget (L∞ in 8-bit levels, on the
colour channels); it measures PSNR and SSIM; and it checks that each text in
the protected manifest is the original text with at most the recorded trigger
inserted (no word changed or lost, responses untouched). Problems are
collected, not raised, so one report names every bad item; `AuditReport.ok`
says whether there were any.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mmguard.data.images import DecodedImage, load_image, read_png_uint8
from mmguard.data.records import Dataset
from mmguard.data.release import RunRecord, per_caption_images, read_run_record
from mmguard.data.resolve import DatasetNotFound, resolve_dataset
from mmguard.data.sources import mirror_manifest_name, read_dataset
from mmguard.data.stealth import linf_levels, psnr_db, ssim
from mmguard.data.trigger_text import is_original_plus_trigger
from mmguard.errors import MMGuardError


@dataclass
class AuditReport:
    folder: str
    original: str
    eps_levels: int
    items: int = 0
    max_linf_levels: int = 0
    mean_psnr_db: float | None = None
    min_psnr_db: float | None = None
    mean_ssim: float | None = None
    min_ssim: float | None = None
    max_trigger_words: int = 0
    texts_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def describe_problems(self, shown: int = 20) -> str:
        """"N problem(s):" and the first `shown` of them, one per line."""
        more = len(self.problems) - shown
        return (f"{len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems[:shown])
                + (f"\n  ... and {more} more" if more > 0 else ""))

    def table(self) -> str:
        def cell(value, digits):
            return "n/a" if value is None else f"{value:.{digits}f}"

        return "\n".join([
            "| check | value |", "|---|---|",
            f"| items | {self.items} |",
            f"| max L∞ (budget) | {self.max_linf_levels}/255 ({self.eps_levels}/255) |",
            f"| PSNR mean / min (dB) | {cell(self.mean_psnr_db, 2)} / "
            f"{cell(self.min_psnr_db, 2)} |",
            f"| SSIM mean / min | {cell(self.mean_ssim, 4)} / {cell(self.min_ssim, 4)} |",
            f"| longest trigger (words) | {self.max_trigger_words} |",
            f"| texts checked | {self.texts_checked} |",
            f"| problems | {len(self.problems)} |"])


def recorded_originals(record: RunRecord) -> Dataset:
    """The dataset the run record says was protected, read as the same kind of data."""
    try:
        return resolve_dataset(record.input.source, record.input.kind)
    except DatasetNotFound:
        raise MMGuardError(f"the originals ({record.input.source}) are not where the run record "
                           "says; name them with --original") from None


def audit_folder(folder: Path, original: str | None = None) -> AuditReport:
    """Audit `folder` against `original` (a manifest or NAME:SPLIT; default: the run
    record's input, read as the same kind of data)."""
    record = read_run_record(folder)
    originals = (resolve_dataset(original, record.input.kind) if original
                 else recorded_originals(record))
    if record.per_caption:
        # Each caption row was released as an image of its own, compared to the same original.
        originals = per_caption_images(originals)
    report = AuditReport(str(folder), originals.source, record.budget.eps_levels)
    by_key = originals.records_by_image()
    manifest = folder / mirror_manifest_name(originals)
    if manifest.exists():
        protected = read_dataset(manifest)
        protected_rows = {file: [protected.records[i] for i in indices]
                          for file, indices in protected.records_by_image().items()}
    else:
        protected_rows = {}
        report.problems.append(f"{manifest}: the protected manifest is missing")
    psnrs, ssims = [], []
    for item in record.items:
        key, file, trigger = item.key, item.file, item.trigger
        if key not in by_key:
            report.problems.append(f"{file}: its original {key!r} is not in {originals.source}")
            continue
        first = originals.records[by_key[key][0]]
        report.items += 1
        report.max_trigger_words = max(report.max_trigger_words, len((trigger or "").split()))
        _check_texts(report, file, [originals.records[i] for i in by_key[key]],
                     protected_rows.get(file, []), trigger)
        try:
            decoded = load_image(first.image, first.where)
            saved = read_png_uint8(folder / file)
        except (MMGuardError, OSError, ValueError) as exc:
            report.problems.append(f"{file}: cannot be read ({exc})")
            continue
        if saved.shape[1:] != decoded.rgb.shape[1:]:
            report.problems.append(f"{file}: size {tuple(saved.shape[1:])} differs from the "
                                   f"original's {tuple(decoded.rgb.shape[1:])}")
            continue
        if problem := _alpha_problem(decoded, saved):
            report.problems.append(f"{file}: {problem}")
            continue
        # The budget holds on the colour channels, against the original's stored colour.
        before, after = decoded.colour, saved[:3]
        change = linf_levels(before, after)
        report.max_linf_levels = max(report.max_linf_levels, change)
        if change > report.eps_levels:
            report.problems.append(f"{file}: changes a pixel by {change}/255, over the budget "
                                   f"of {report.eps_levels}/255")
        psnrs.append(psnr_db(before, after))
        if (value := ssim(before, after)) is not None:
            ssims.append(value)
    finite = [p for p in psnrs if p != float("inf")]
    if finite:
        report.mean_psnr_db, report.min_psnr_db = statistics.mean(finite), min(finite)
    if ssims:
        report.mean_ssim, report.min_ssim = statistics.mean(ssims), min(ssims)
    if report.items == 0:
        report.problems.append(f"{folder}: the run record lists no finished items")
    return report


def _alpha_problem(original: DecodedImage, saved: torch.Tensor) -> str | None:
    """What is wrong with the saved file's transparency, if anything: it must be the original's."""
    if original.alpha is None:
        return "has an alpha channel; the original is opaque" if len(saved) == 4 else None
    if len(saved) != 4:
        return "has no alpha channel; the original's transparency was lost"
    differing = int((saved[3] != original.alpha[0]).sum().item())
    if differing:
        return f"its alpha channel differs from the original's in {differing} pixel(s)"
    return None


def audit_or_raise(folder: Path) -> AuditReport:
    """Audit `folder` against the originals its run record names; an error naming the
    problems if there are any (for callers about to publish or use the folder)."""
    report = audit_folder(folder)
    if not report.ok:
        raise MMGuardError(f"{folder} fails its audit: {report.describe_problems(10)}")
    return report


def _check_texts(report: AuditReport, file: str, originals: list, protected: list,
                 trigger: str | None) -> None:
    if not protected:
        report.problems.append(f"{file}: not in the protected manifest")
        return
    if len(protected) != len(originals):
        report.problems.append(f"{file}: {len(protected)} manifest rows, the original has "
                               f"{len(originals)}")
        return
    for before, after in zip(originals, protected, strict=True):
        for (name, old), (_, new) in zip(before.named_texts(), after.named_texts(), strict=True):
            report.texts_checked += 1
            # The trigger goes into captions and prompts; a response must be untouched.
            if not is_original_plus_trigger(old, new, None if name == "response" else trigger):
                report.problems.append(f"{file}: {name} {new!r} is not the original {old!r} "
                                       f"plus the trigger {trigger!r}")
