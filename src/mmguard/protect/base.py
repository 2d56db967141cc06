"""The contract every protection method implements.

A method receives the images of a dataset (float RGB in [0, 1] at their stored
resolution, with the texts of every record of that image) and returns, per
image, the protected float image and optionally a text trigger. The shared
runner does everything else: reading, validation, batching, quantising within
the budget, writing files and run records, resuming.

Methods that optimise over the whole dataset before emitting anything (EM,
MEM: the surrogate is trained across rounds) do that work in `prepare`, which
sees a re-iterable stream of batches; per-item state there must stream to
disk, never sit in a dataset-sized tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class ProtectionItem:
    key: str  # the image's key in its dataset
    image: torch.Tensor  # float32 (3, H, W) in [0, 1]
    texts: list[str]  # captions (pairs) or prompts (triples) of every record of the image


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
    trigger_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


BatchStream = Callable[[], Iterator[list[ProtectionItem]]]


class ProtectionMethod(ABC):
    """Base class: one subclass per method, one file per subclass."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Options of MethodSettings that this method reads, besides eps and seed.
    uses: ClassVar[frozenset[str]] = frozenset()
    trigger_position: ClassVar[str] = "start"

    def __init__(self, settings: MethodSettings):
        self.settings = settings

    def prepare(self, batches: BatchStream) -> None:  # noqa: B027 - optional hook
        """Dataset-level optimisation before any output is written (default: none)."""

    @abstractmethod
    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        """Protected images (and triggers) for one batch, in the batch's order."""

    def describe(self) -> dict[str, Any]:
        """Everything that decides the output, for the run record and resume checks."""
        described = {"method": self.name, "eps": self.settings.eps, "seed": self.settings.seed}
        for option in sorted(self.uses):
            value = getattr(self.settings, option)
            described[option] = list(value) if isinstance(value, tuple) else value
        return described
