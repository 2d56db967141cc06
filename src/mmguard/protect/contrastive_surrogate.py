"""A CLIP-style surrogate for the contrastive methods, and the losses they share.

The surrogate is built from the model registry, trained with AdamW (MEM's
reference settings: lr 1e-4, weight decay 0.2) on whatever the method feeds
it, and put in eval mode while perturbations are optimised so BatchNorm
statistics are not moved by PGD or trigger search.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.models.contrastive import ContrastiveModel, info_nce
from mmguard.models.registry import create_contrastive_model
from mmguard.protect.base import MethodSettings
from mmguard.protect.state import PerturbationStore

DEFAULT_SURROGATE = "rn-tiny"
CHECKPOINT = "surrogate.pt"
TEXT_CHUNK = 512


class ContrastiveSurrogate:
    def __init__(self, settings: MethodSettings):
        if len(settings.surrogates) > 1:
            from mmguard.errors import MMGuardError

            raise MMGuardError("contrastive methods take one --surrogate (ensembles come with "
                               "the LVLM methods)")
        self.name = settings.surrogates[0] if settings.surrogates else DEFAULT_SURROGATE
        torch.manual_seed(settings.seed)
        self.model: ContrastiveModel = create_contrastive_model(
            self.name, settings.surrogate_pretrained, settings.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.surrogate_lr,
                                           weight_decay=0.2)
        self.device = torch.device(settings.device)

    def train_step(self, images: Sequence[torch.Tensor], ids: torch.Tensor) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = pair_loss(self.model, self.model.preprocess(_to(images, self.device)),
                         ids.to(self.device))
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def loss(self, images: Sequence[torch.Tensor], ids: torch.Tensor) -> float:
        self.model.eval()
        return float(pair_loss(self.model, self.model.preprocess(_to(images, self.device)),
                               ids.to(self.device)))

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


@contextlib.contextmanager
def perturbation_mode(model: ContrastiveModel, batch_statistics: bool):
    """The surrogate's mode while noise and triggers are optimised.

    Default: eval mode, BatchNorm uses its running statistics. With
    `batch_statistics`, BatchNorm normalises with the batch's own statistics,
    as it does while an attacker trains, but its running statistics are left
    untouched (momentum 0 for the duration).
    """
    if not batch_statistics:
        model.eval()
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.train()
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()


def restore_surrogate(settings: MethodSettings, store: PerturbationStore) -> ContrastiveSurrogate:
    """A fresh surrogate, or the one checkpointed in `store` by an interrupted run."""
    surrogate = ContrastiveSurrogate(settings)
    saved = store.load_module(CHECKPOINT)
    if saved is not None:
        surrogate.load(saved)
    return surrogate


def checkpoint_surrogate(surrogate: ContrastiveSurrogate, store: PerturbationStore) -> None:
    store.save_module(CHECKPOINT, surrogate.state())


def _to(images: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [image.to(device) for image in images]


def pair_loss(model: ContrastiveModel, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return info_nce(model.logits(model.encode_pixels(pixels), model.encode_text(ids)))


@torch.no_grad()
def encode_text_chunked(model: ContrastiveModel, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.encode_text(chunk) for chunk in ids.split(TEXT_CHUNK)])


def replaced_column_losses(logits: torch.Tensor, owners: torch.Tensor,
                           columns: torch.Tensor) -> torch.Tensor:
    """InfoNCE of the batch when text `owners[m]`'s logits column becomes `columns[:, m]`.

    logits: (B, B) current image x text logits; owners: (M,); columns: (B, M).
    Returns (M,) exact batch losses, computed for all M candidates at once.
    """
    batch = logits.shape[0]
    candidates = logits.unsqueeze(0).repeat(owners.numel(), 1, 1)  # (M, B, B)
    candidates[torch.arange(owners.numel()), :, owners] = columns.T
    diagonal = torch.arange(batch)
    image_to_text = -F.log_softmax(candidates, dim=2)[:, diagonal, diagonal].mean(dim=1)
    text_to_image = -F.log_softmax(candidates, dim=1)[:, diagonal, diagonal].mean(dim=1)
    return (image_to_text + text_to_image) / 2
