"""What `mmguard protect` runs when no method is named, and its `--strength` presets.

A data owner who does not know the methods should get the one that protected best
in our measurements, told which it is and on what evidence, not the first name in a
list. Each recommendation cites the benchmark row it rests on; change it only with a
new row (`mmguard lab ... --on test` over 3 seeds with every control). A
recommendation also carries the method options of the measured setting, which
`mmguard protect` and the demo apply unless the user gives them.

Strength presets trade visibility for effect, as Fawkes' low/mid/high do: each sets
the L-infinity budget and scales the method's default PGD steps (more budget needs
more steps to be used). An explicit `--eps` or `--pgd-steps` wins over the preset.
A recommendation may name the preset and options its own measurements chose for
large images (`large_side`, `large_strength`, `large_options`), which `mmguard
protect` applies when the user names neither a preset nor a budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmguard.data.budget import as_levels
from mmguard.data.images import median_shorter_side
from mmguard.data.records import ImageRef
from mmguard.errors import MMGuardError
from mmguard.protect.registry import method_class


@dataclass(frozen=True)
class Recommendation:
    method: str
    evidence: str  # one line for the user: what was measured
    caveat: str = ""  # what the evidence does not cover
    # The method options of the measured setting, where they differ from its
    # defaults; options the user gives win.
    options: dict[str, Any] = field(default_factory=dict)
    # Noise that protects a small image shows on a large, mostly flat one. From this
    # median shorter side (px; 0: never) the default is preset `large_strength` with
    # `large_options` over `options`, and `large_evidence` says what was measured there.
    large_side: int = 0
    large_strength: str | None = None
    large_evidence: str = ""
    large_options: dict[str, Any] = field(default_factory=dict)

    def describe_options(self) -> str:
        """The options as `mmguard protect` flags: "--pgd-steps 100, --pretrained-too"."""
        return as_flags(self.options)

    def describe_large(self) -> str:
        """The large-image setting: "mid with --pattern-share 0.5, --pgd-steps 20"."""
        flags = as_flags(self.large_options)
        return f"{self.large_strength}" + (f" with {flags}" if flags else "")


def as_flags(options: dict[str, Any]) -> str:
    """Method options as `mmguard protect` flags: "--pgd-steps 100, --pretrained-too"."""
    flags = []
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # an on/off flag takes no value
            flags += [flag] if value else []
        else:
            # a budget or step size reads as levels ("2/255"), a share as itself ("0.5")
            text = (as_levels(value) or f"{value:g}") if isinstance(value, float) else value
            flags.append(f"{flag} {text}")
    return ", ".join(flags)


RECOMMENDED: dict[str, Recommendation] = {
    "triples": Recommendation(
        "wrong-target",
        "on Fashion-MNIST VQA a LoRA-fine-tuned smolvlm-lite answered 22.2% right after "
        "training on it, against 76.7% on clean data and 78.5% on uniform noise of the same "
        "budget (3 seeds; benchmarks/results/lab-bench.md); on 73-answer emoji categories, "
        "5.5% against 35.3% clean and 28.2% uniform (test split, 3 seeds); on 512-px "
        "photos of emoji (emoji-groups, 9 answers), 8.2% against 59.0% clean and 57.0% "
        "uniform, and 17.8% with the split budget such photos get (3 seeds; "
        "benchmarks/results/lab-real-size.md)",
        "measured with the attacker's own vision tower as the surrogate (white box). It protects "
        "against the tower families in its surrogate ensemble and no others: made on EfficientNet "
        "and DINOv2 (--surrogate smolvlm-lite --surrogate smolvlm-lite-c --member-units) it cost "
        "their attackers 63% and 40% (3 seeds), and attackers on ResNet-50 and VGG16 7% and under "
        "1% (one seed each); made on one family, it moved none of the other three more than 7 "
        "points below uniform noise (all 12 pairs of the four families on Fashion-MNIST, one seed "
        "each; at 512 px the default cost a ResNet-50 attacker 22% and a DINOv2 one nothing, one "
        "seed each). No release measured so far, with or without a model, reaches every family it "
        "was not made on: the model-free square wave per answer (--method class-pattern --cells 8 "
        "--gray-noise --values square, SSIM 0.91) cost ResNet-50 61% and EfficientNet 23% (3 seeds)"
        " but DINOv2 and VGG16 nothing (one seed each); shift-pattern made on two families cost "
        "ResNet-50 54% and, made without it, EfficientNet 8% (3 seeds each). An attacker who "
        "JPEG-compresses 28-px images undoes wrong-target (--robust jpeg kept 6 of 58 points, one "
        "seed); on 512-px images JPEG-75 left 97% of it (8.8% against 58.2% clean, 3 seeds). At 512"
        " px the mid release's SSIM is 0.86, so images that large get the collision in half the "
        "budget around a luma grid per answer (SSIM 0.95), which also cost a ResNet-50 attacker "
        "34% (3 seeds); on 28-px images the two halves did not add (-51% and -26%). Details and "
        "every row: docs/findings-lvlm.md",
        # 4x the 128-px input of smolvlm-lite, where it was measured. At that size the two
        # halves of the budget add: the collision in 4/255 does what the low preset does
        # alone, and a 4/255 luma grid per answer is a shortcut for a ResNet-50 attacker
        # the release was not made on. On 28-px images they did not add (-51% / -26%).
        large_side=512, large_strength="mid",
        large_options={"pattern_share": 0.5, "pattern_cells": 8, "pattern_gray_noise": True,
                       "pgd_steps": 20},
        large_evidence="on 512-px photos of emoji a collision in half the 8/255 budget, around "
        "a luma 8x8 grid per answer in the other half, keeps SSIM 0.95 (the plain collision at "
        "8/255: 0.86) and left a LoRA-fine-tuned smolvlm-lite 17.8% right against 59.0% clean "
        "and 57.0% with uniform noise, and a ResNet-50 attacker it was not made on "
        "(smolvlm-lite-d) 37.8% against 57.2% clean and 58.0% uniform (3 seeds; "
        "benchmarks/results/lab-real-size.md); it kept 72-124% of those drops when the "
        "attackers JPEG-compressed or halved the images (the white-box one JPEG-compressing "
        "them: 89%, the ResNet-50 one halving them: 72%, 3 seeds each), 107% when the "
        "white-box one blurred them (sigma 1 px) and 58% when it turned them gray (3 seeds; "
        "91% with --gray-noise and 87% with --robust grayscale --robust-every, which cost the "
        "ResNet-50 attacker 26% and 21% instead; one seed each), and does not reach a DINOv2 "
        "or a VGG16 attacker (-2%, 0%; one seed each)"),
    "pairs": Recommendation(
        "wrong-target",
        "on emoji (test split, 3 seeds; benchmarks/results/lab-emoji-pairs.md) the right "
        "caption's median rank of 391 was 106 against the pretrained LiT trained as a linear "
        "probe on the protected data (8 clean, 15 with uniform noise of the same budget; "
        "random 196), and 55 against the LiT fine-tuned in full and scored with its BatchNorm "
        "statistics re-read on clean images (26 clean, 27 uniform); it is trigger-free, so "
        "rare-word stripping cannot undo it",
        "measured with the attacker's own image tower as the surrogate (white box): the "
        "features are moved on the pretrained LiT tower and on one fine-tuned on the data "
        "and re-trained on the release between rounds; a CLIP trained from scratch, or an "
        "attacker on another tower family (DINOv2), does not see the move; a fine-tuner at "
        "lr 3e-4 learns past most of it on 64-px emoji (median rank 34, uniform 15); on them "
        "an attacker who JPEG-compresses, blurs or halves the resolution keeps 3-8% of its "
        "effect on the linear probe (on 600 scenes of 512 px it kept 91-93% under each; JPEG "
        "over 3 seeds, the others one); on 1,500 training scenes of 512 px it left the median "
        "rank of 400 at 143 against the LiT fine-tuned in full, scored as trained (70 clean, "
        "69 uniform; 135 against 68 and 70 with its statistics re-read), at 116 against one "
        "at lr 3e-4 (43, 42), and at 144 against the probe (48, 51; 3 seeds each); "
        "against the fine-tuner there it kept 95-101% of its effect under JPEG-75, blur, "
        "resize and rare-word stripping and 72% under grayscale (3 seeds each; grayscale "
        "alone halves his clean result, and the release is 1.35x his gray uniform control); "
        "about 1.3 s per 64-px image and 3.0 s per 512-px scene on 2 cores "
        "(docs/findings.md §10, §17, §25, §27, §28, §33, §34, §35, §36)",
        # Both towers: the pretrained one holds the linear probe, the fine-tuned one the
        # fine-tuner, which moves the weights away from the pretrained features (§22-§25).
        # Re-training in passes over the data keeps small folders cheap.
        options={"pgd_steps": 25, "step_schedule": "cosine", "step_size": 2 / 255,
                 "clean_epochs": 5, "rounds": 4, "retrain_epochs": 2, "pretrained_too": True}),
}


@dataclass(frozen=True)
class Strength:
    eps: float  # L-infinity budget on pixels in [0, 1]
    effort: float  # multiplies the method's default PGD steps


STRENGTHS: dict[str, Strength] = {
    "low": Strength(eps=4 / 255, effort=0.5),
    "mid": Strength(eps=8 / 255, effort=1.0),
    "high": Strength(eps=16 / 255, effort=2.0),
}
DEFAULT_EPS = STRENGTHS["mid"].eps


def recommended_method(kind: str) -> Recommendation:
    if kind not in RECOMMENDED:
        raise MMGuardError(f"no recommended method for {kind!r} data; choose pairs or triples")
    return RECOMMENDED[kind]


def size_strength(chosen: Recommendation, images: Sequence[ImageRef]) -> tuple[str, int] | None:
    """(preset, median shorter side) when the images are large enough for the
    recommendation's large-image preset; None otherwise."""
    if not chosen.large_strength:
        return None
    side = median_shorter_side(images)
    if side is None or side < chosen.large_side:
        return None
    return chosen.large_strength, side


def apply_strength(method: str, strength: str | None, eps: float | None,
                   options: dict[str, Any], base: dict[str, Any] | None = None,
                   ) -> tuple[float, dict[str, Any]]:
    """(budget, method options) after the preset; what the user gave explicitly stays.

    `base` holds the options of a recommendation (under the user's): the preset scales
    its PGD steps, not the method's default, so `--strength low` halves the effort of
    the measured setting.
    """
    base = base or {}
    merged = {**base, **options}
    if strength is None:
        return (DEFAULT_EPS if eps is None else eps), merged
    if strength not in STRENGTHS:
        raise MMGuardError(f"unknown strength {strength!r}; choose {', '.join(STRENGTHS)}")
    preset = STRENGTHS[strength]
    defaults = {f.name: f.default for f in dataclasses.fields(method_class(method).Config)}
    if "pgd_steps" in defaults and "pgd_steps" not in options:
        steps = base.get("pgd_steps", defaults["pgd_steps"])
        merged["pgd_steps"] = max(1, round(steps * preset.effort))
    return (preset.eps if eps is None else eps), merged
