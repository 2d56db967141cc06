"""The contract every surrogate family implements, so a method never asks which family it has.

A protection method optimises image noise (and optionally a text trigger)
against a surrogate. Whatever the surrogate is (a CLIP-style model scored by
InfoNCE over the batch, or one or several LVLMs scored by the response loss
plus a binding term), the method only needs:

- `train_step`: one optimisation step of the surrogate on a protected batch
  (the inner minimisation of bilevel methods);
- `reference` then `noise_loss`: a scalar loss of perturbed images with the
  texts held fixed (what PGD descends or ascends); anything that depends only
  on the texts or on the clean images is computed once per batch;
- `trigger_search`: gradients w.r.t. the trigger tokens' embeddings and the
  exact loss of candidate triggers (rejecting ids that would not survive being
  released as text), for HotFlip;
- `trigger_vocabulary`, `initial_trigger`, `decode_trigger`,
  `embedding_matrix`: what trigger tokens may be and how they read;
- `trainable_parameters`, `state` / `load`: what trains, checkpointed with a run.

Texts are `TextItem`s: the caption (pairs) or prompt and response (triples)
with the trigger as token ids of the surrogate's vocabulary and where it is
inserted.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

Images = Sequence[torch.Tensor]  # float (3, H, W) in [0, 1], each at its stored size


@dataclass(frozen=True)
class TextItem:
    """The text one image is scored with."""

    text: str  # the caption, or the prompt of a triple
    response: str | None = None  # triples only
    trigger: tuple[int, ...] = ()  # trigger token ids (empty: no trigger)
    position: str | int = "start"  # where the trigger is inserted: start, end or a word index

    def with_trigger(self, trigger: Sequence[int]) -> TextItem:
        return TextItem(self.text, self.response, tuple(trigger), self.position)


class TriggerSearch(Protocol):
    """One batch's trigger search, with whatever does not change precomputed."""

    def gradients(self) -> torch.Tensor:
        """(B, k, E) gradient of the loss w.r.t. each trigger token's input embedding."""

    def score(self, rows: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
        """(M,) exact loss when only item `rows[m]`'s trigger becomes `triggers[m]`.

        The batch's loss when items interact (`Surrogate.items_interact`), the
        item's own otherwise; inf for a trigger that re-tokenises differently.
        """

    def joint(self, triggers: torch.Tensor) -> float:
        """The batch loss with every item's trigger replaced by `triggers` (B, k)."""


class Surrogate(ABC):
    """Base class of the surrogate families (one file each in this package)."""

    family: ClassVar[str]
    # Whether a batch's items share one loss (InfoNCE's denominator): then a
    # joint trigger update can raise the loss even if each item's change lowers it.
    items_interact: ClassVar[bool] = False
    names: list[str]

    @property
    def name(self) -> str:
        return "+".join(self.names)

    # -- inner minimisation ----------------------------------------------------
    @abstractmethod
    def train_step(self, images: Images, texts: Sequence[TextItem]) -> float:
        """One optimisation step on the batch; returns its loss."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What `train_step` updates (empty: the surrogate stays fixed)."""
        return []

    def adapt(self, images: Images, texts: Sequence[TextItem]) -> float | None:
        """Temporary adaptation to the protected batch before the outer updates (MMGuard's
        inner LoRA steps), undone by `end_round`; returns its loss (None: no adaptation)."""
        return None

    def end_round(self) -> None:  # noqa: B027 - optional hook
        """Discard what `adapt` learnt this round."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue (trained weights, optimiser)."""

    @abstractmethod
    def load(self, state: dict[str, Any]) -> None:
        """Restore `state()`."""

    @contextlib.contextmanager
    def perturbation_mode(self, batch_statistics: bool = False) -> Iterator[None]:
        """The mode while noise and triggers are optimised (default: eval)."""
        yield

    # -- losses ------------------------------------------------------------------
    def reference(self, clean: Images, texts: Sequence[TextItem]) -> Any:
        """What the loss compares a protected input with, from the clean batch (default none)."""
        return None

    @abstractmethod
    def noise_loss(self, texts: Sequence[TextItem],
                   reference: Any = None) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """Perturbed images -> scalar loss with these texts (differentiable w.r.t. the images)."""

    @abstractmethod
    def measure(self, images: Images, texts: Sequence[TextItem],
                reference: Any = None) -> dict[str, float]:
        """The batch's loss and its parts, for the run record; `train_loss` first."""

    def image_features(self, images: Images) -> torch.Tensor:
        """(B, D) what the surrogate's frozen image tower makes of each image
        (differentiable): the representation wrong-target methods move."""
        from mmguard.errors import MMGuardError

        raise MMGuardError(f"{self.name} does not expose image features")

    def image_feature_parts(self, images: Images) -> list[torch.Tensor]:
        """`image_features` split by ensemble member (one part for a single model):
        members' features differ in scale, so a loss can weigh each in its own units."""
        return [self.image_features(images)]

    # -- triggers ----------------------------------------------------------------
    @abstractmethod
    def trigger_search(self, images: Images, texts: Sequence[TextItem],
                       reference: Any = None) -> TriggerSearch:
        """HotFlip's view of the batch (image side fixed)."""

    @abstractmethod
    def trigger_vocabulary(self, natural: bool, size: int | None, seed: int) -> torch.Tensor:
        """Token ids a trigger may use (whole words that survive release as text)."""

    @abstractmethod
    def initial_trigger(self, length: int) -> list[int]:
        """The trigger every item starts from."""

    @abstractmethod
    def decode_trigger(self, ids: Sequence[int]) -> str:
        """Trigger ids -> the words inserted into the released text."""

    @abstractmethod
    def embedding_matrix(self) -> torch.Tensor:
        """(V, E) input token embeddings that trigger gradients are measured against."""
