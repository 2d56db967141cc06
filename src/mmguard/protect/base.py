"""The contract every protection method implements.

A method receives the images of a dataset (float RGB in [0, 1] at their stored
resolution, with the texts of every record of that image) and returns, per
image, the protected float image and optionally a text trigger. The shared
runner does everything else: reading, validation, batching, quantising within
the budget, writing files and run records, resuming.

Methods that optimise over the whole dataset before emitting anything (EM,
MEM: the surrogate is trained across rounds) do that work in `prepare`, which
gets a `DatasetView` (keys, texts, images loaded on demand) and a work folder;
per-item state there streams to disk (see `state.py`), never into a
dataset-sized tensor, and the work folder lets a killed run resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch


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


@dataclass
class MethodSettings:
    """Options shared by every method; each method reads the ones it uses."""

    eps: float = 8 / 255
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16
    surrogates: tuple[str, ...] = ()
    surrogate_pretrained: str | None = None
    trigger_len: int | None = None
    natural_triggers: bool = False
    trigger_vocab: int | None = None
    rounds: int = 10
    pgd_steps: int = 8
    step_size: float = 1 / 255
    train_steps: int = 1
    top_k: int = 16
    beam_width: int = 1
    trigger_rounds: int | None = None
    stop_loss: float = 0.01
    surrogate_lr: float = 1e-4
    surrogate_bn: str = "running"
    clean_epochs: int = 10
    # LVLM methods (MMGuard)
    binding: str = "bph"
    binding_weight: float = 0.5
    components: str = "image+text"
    trigger_position: str = "end"
    trigger_groups: str = "item"
    noise_groups: str = "item"
    bilevel: bool = False


class DatasetView(Protocol):
    """What `prepare` sees of the dataset: its images' keys and texts, and a loader."""

    keys: list[str]
    texts: dict[str, list[str]]

    def load(self, keys: Sequence[str]) -> list[ProtectionItem]:
        """Decode these images; bad ones are skipped (--skip-bad) or raise BadItemError."""


class ProtectionMethod(ABC):
    """Base class: one subclass per method, one file per subclass."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Options of MethodSettings that this method reads, besides eps and seed.
    uses: ClassVar[frozenset[str]] = frozenset()
    trigger_position: ClassVar[str] = "start"
    # Dataset kinds the method protects.
    kinds: ClassVar[tuple[str, ...]] = ("pairs", "triples")
    # Method-specific defaults for options the user left out.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, settings: MethodSettings):
        self.settings = settings

    def prepare(self, data: DatasetView, workdir: Path) -> None:  # noqa: B027 - optional hook
        """Dataset-level optimisation before any output is written (default: none).

        `workdir` is kept between a run and its `--resume`; state saved there
        lets a killed run continue where it stopped.
        """

    @abstractmethod
    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        """Protected images (and triggers) for one batch, in the batch's order."""

    def report(self) -> dict[str, Any]:
        """What the optimisation did (losses per round...), for the run record."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Everything that decides the output, for the run record and resume checks."""
        described = {"method": self.name, "eps": self.settings.eps, "seed": self.settings.seed}
        for option in sorted(self.uses):
            value = getattr(self.settings, option)
            described[option] = list(value) if isinstance(value, tuple) else value
        return described
