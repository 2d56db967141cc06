"""The contract every protection method implements, and the configs that set them up.

A method receives the images of a dataset (float RGB in [0, 1] at their stored
resolution, with the texts of every record of that image) and returns, per
image, the protected float image and optionally a text trigger. The shared
runner does everything else: reading, validation, batching, quantising within
the budget, writing files and run records, resuming.

Each method has its own `Config` dataclass: its options, their defaults and
their help text (the command line is built from these), so a method's
defaults live in exactly one place.

Methods that optimise over the whole dataset before emitting anything (EM,
MEM, MMGuard: the surrogate is trained across rounds) do that work in
`prepare`, which gets a `DatasetView` (keys, texts, images loaded on demand)
and a work folder; per-item state there streams to disk (see `state.py`),
never into a dataset-sized tensor, and the work folder lets a killed run resume.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from mmguard.errors import MMGuardError
from mmguard.protect.pgd import grid_size, upsample_noise
from mmguard.protect.seeding import item_generator


@dataclass
class ProtectionItem:
    key: str  # the image's key in its dataset
    image: torch.Tensor  # float32 (3, H, W) in [0, 1]
    texts: list[str]  # captions (pairs) or prompts (triples) of every record of the image
    responses: list[str] | None = None  # triples: the response of each prompt, same order


@dataclass
class ProtectedItem:
    image: torch.Tensor  # float (3, H, W) in [0, 1]; quantised by the runner
    trigger: str | None = None  # text inserted into each of the item's texts


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help (and click settings such as `choices`,
    `type` or `min`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata={"help": help, **cli})


def coarse_option() -> Any:
    """The noise grid of `pgd(coarse=...)`, shared by the optimised methods and the
    uniform control (which must draw the same kind of noise)."""
    return option(1, "Noise on a grid this many times coarser than each image, upsampled "
                  "(bilinear): low-frequency noise, which JPEG, resizing and blur remove "
                  "less; give the uniform control the same value (1: per pixel).",
                  min=1, max=64)


def cells_option() -> Any:
    """The fixed noise grid of `pgd(cells=...)`: a size relative to the picture."""
    return option(0, "Noise on a grid of this many x this many cells whatever each image's "
                  "size, stretched to it (bilinear; 0: off, use coarse): the pattern keeps "
                  "its size relative to the picture, which is what a model sees after "
                  "resizing, and images of different sizes can share a group's pattern; "
                  "give the uniform control the same value.", min=0, max=1024)


WAVE_VALUES = ("grating", "square")  # the values drawn as a wave, which a `Wave` can set
NOISE_VALUES = ("uniform", "sign", *WAVE_VALUES)


def noise_values_option(default: str = "uniform", about: str = "") -> Any:
    """How the random methods (the uniform control, class-pattern) draw each cell;
    `about` starts the help (which method and option it is for)."""
    return option(default, about + "Random noise cells uniform in [-eps, eps] (uniform) or +-eps "
                  "(sign: the largest change the budget allows everywhere), or a grating: "
                  "a sinusoid of amplitude eps, random orientation and phase, one period "
                  "per two cells of the grid (texture, not brightness); square: the "
                  "grating's sign (+-eps everywhere).",
                  choices=NOISE_VALUES)


@dataclass(frozen=True)
class Wave:
    """A grating's orientation in radians and its frequency relative to the grid's (1: one
    period per two cells), when they are set rather than drawn (class-pattern's spread
    layout)."""

    angle: float
    frequency: float = 1.0


def spread_waves(count: int, seed: int) -> list[Wave]:
    """`count` waves whose orientations are evenly spread over the half turn (from a
    seeded offset), alternately at frequency 1 and 1.5, dealt to the groups in a seeded
    order. Why: a pooled CNN feature hardly sees a wave's phase, so two groups whose
    random orientations fall a few degrees apart (10 random angles: the closest pair is
    about 2 degrees apart on average) carry nearly the same pattern; spread, every pair
    differs by 180/count degrees, or in frequency. Measured on Fashion-MNIST: no better
    than random orientations (docs/findings-lvlm.md, "Spread waves")."""
    generator = item_generator(seed, f"spread waves {count}")
    offset = torch.rand(1, generator=generator).item() * math.pi / count
    order = torch.randperm(count, generator=generator).tolist()
    return [Wave(offset + math.pi * slot / count, 1.0 if slot % 2 == 0 else 1.5)
            for slot in order]


def random_noise(image: torch.Tensor, eps: float, coarse: int, gray: bool, values: str,
                 generator: torch.Generator, cells: int = 0,
                 wave: Wave | None = None) -> torch.Tensor:
    """Random noise for `image` in [-eps, eps]: cells drawn as `noise_values_option` says,
    on a grid `coarse` times coarser (or of `cells` x `cells`; bilinearly upsampled), or
    a wave at that grid's scale (grating, square; of orientation and frequency `wave`
    if given), in one channel if `gray`."""
    channels, height, width = image.shape
    shape = (1 if gray else channels, *grid_size(image, coarse, cells))
    if wave is not None and values not in WAVE_VALUES:
        raise ValueError(f"a set wave needs values grating or square, not {values}")
    if values in WAVE_VALUES:
        pattern = grating(shape, (height, width), eps, generator, wave)
        if values == "square":
            pattern = torch.sign(pattern) * eps
        return pattern.expand(channels, height, width)
    if values == "sign":
        grid = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float() * eps
    else:
        grid = torch.rand(shape, generator=generator) * (2 * eps) - eps
    return upsample_noise(grid, (height, width)).expand(channels, height, width)


def grating(grid: tuple[int, int, int], size: tuple[int, int], eps: float,
            generator: torch.Generator, wave: Wave | None = None) -> torch.Tensor:
    """(C, H, W) sinusoids of amplitude eps, one per channel of `grid` (C, h, w), each of a
    random orientation and phase, with one period per two grid cells along each axis'
    share of it: a texture whose scale is the grid's, where a grid of cells is a
    brightness map. Why: a model trained to ignore brightness and colour jitter (DINOv2)
    may still read oriented texture at its patch scale. `wave` sets the orientation of
    every channel and scales the frequency; the phases are the same draws either way."""
    count, rows, cols = grid
    height, width = size
    angle = torch.rand(count, 1, 1, generator=generator) * math.pi
    phase = torch.rand(count, 1, 1, generator=generator) * (2 * math.pi)
    if wave is not None:
        angle = torch.full_like(angle, wave.angle)
        rows, cols = rows * wave.frequency, cols * wave.frequency
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    # cycles across the image: half the grid's cells, along the wave's direction
    cycles = (angle.cos() * x.view(1, 1, width) * (cols / 2)
              + angle.sin() * y.view(1, height, 1) * (rows / 2))
    return torch.sin(2 * math.pi * cycles + phase) * eps


def group_pattern(image: torch.Tensor, group: str, eps: float, seed: int, coarse: int = 1,
                  gray: bool = False, values: str = "sign", cells: int = 0,
                  wave: Wave | None = None) -> torch.Tensor:
    """The fixed random pattern of `group` for an image of this size, in [-eps, eps]
    (class-pattern's shortcut). Seeded by the group and the noise grid, so the images
    of one group and one size share it (with `cells`, of every size: one grid); a wave
    pattern takes the orientation and frequency of `wave` if given."""
    grid = (1 if gray else image.shape[0], *grid_size(image, coarse, cells))
    return random_noise(image, eps, coarse, gray, values,
                        item_generator(seed, f"{group} {grid}"), cells, wave)


def gray_noise_option() -> Any:
    return option(False, "The same noise in R, G and B (luma only): grayscale conversion "
                  "keeps it and JPEG quantises it finely; give the uniform control the same.",
                  flag=True)


@dataclass
class MethodConfig:
    """Options every method has."""

    eps: float = option(8 / 255, "L-infinity budget on pixels in [0, 1].")
    seed: int = option(0, "Random seed; the same seed and input give byte-identical output.")


def config_options(config: type[MethodConfig]) -> dict[str, dataclasses.Field]:
    """The options of a config class by name (eps and seed included)."""
    return {f.name: f for f in dataclasses.fields(config)}


class DatasetView(Protocol):
    """What `prepare` sees of the dataset: its images' keys and texts, and a loader."""

    keys: list[str]
    texts: dict[str, list[str]]

    def load(self, keys: Sequence[str]) -> list[ProtectionItem]:
        """Decode these images; bad ones are skipped (--skip-bad) or raise BadItemError."""


class ProtectionMethod(ABC):
    """Base class: one subclass per method, one file per subclass (in `methods/`)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Dataset kinds the method protects.
    kinds: ClassVar[tuple[str, ...]] = ("pairs", "triples")

    def __init__(self, config: MethodConfig | None = None, kind: str | None = None):
        """`kind` is the kind of data the run protects ("pairs"/"triples"), when known;
        methods whose defaults depend on it (the default surrogate) read it."""
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}, not "
                            f"{type(self.config).__name__}")
        self.kind = kind or self.kinds[0]
        if getattr(self.config, "cells", 0) and getattr(self.config, "coarse", 1) > 1:
            raise MMGuardError(f"{self.name}: give the noise grid as coarse (a factor of each "
                               f"image's size) or as cells (a fixed grid), not both")

    @property
    def batch_size(self) -> int:
        """Images per `protect_batch` call (and per optimisation batch)."""
        return getattr(self.config, "batch_size", 16)

    @property
    def release_per(self) -> str:
        """"image": one protected file per image, shared by all its caption rows;
        "caption": one per caption row, each with its own noise and trigger (the runner
        then protects `data.release.per_caption_images` of the dataset)."""
        return "image"

    @property
    def trigger_position(self) -> str | int:
        """Where the released text gets the trigger: "start", "end" or a word index."""
        return "start"

    def prepare(self, data: DatasetView, workdir: Path) -> None:  # noqa: B027 - optional hook
        """Dataset-level optimisation before any output is written (default: none).

        `workdir` is kept between a run and its `--resume`; state saved there
        lets a killed run continue where it stopped.
        """

    @abstractmethod
    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        """Protected images (and triggers) for one batch, in the batch's order."""

    def report(self) -> dict[str, Any]:
        """What the optimisation did (losses per round...), for the run record.

        Called also when a run failed early, so it must not assume `prepare` ran.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """Everything that decides the output, for the run record and resume checks."""
        described: dict[str, Any] = {"method": self.name}
        for name, value in dataclasses.asdict(self.config).items():
            described[name] = list(value) if isinstance(value, tuple) else value
        return described
