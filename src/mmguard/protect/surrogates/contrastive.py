"""CLIP-style surrogates: one contrastive model scored by symmetric InfoNCE over the batch.

Trained with AdamW (MEM's reference settings: lr 1e-4, weight decay 0.2) on
whatever the method feeds it, and put in eval mode while perturbations are
optimised so BatchNorm statistics are not moved by PGD or trigger search
(`batch_statistics` normalises with each batch's own statistics instead, as
an attacker's training does, without touching the running ones).

Triggers are token ids placed before the caption (`compose_ids`), so the
released caption is "trigger caption"; the model's own whole-word tokens keep
the trigger intact when the text is tokenised again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.contrastive import ContrastiveModel, info_nce
from mmguard.models.registry import create_contrastive_model
from mmguard.models.training import Trainer, batchnorm_layers
from mmguard.protect.surrogates.base import Images, Surrogate, TextItem
from mmguard.protect.triggers import trigger_vocabulary

TEXT_CHUNK = 512
INITIAL_TRIGGER_WORD = "the"  # MEM initialises every trigger as "the the the"


class ContrastiveSurrogate(Surrogate):
    family = "contrastive"
    items_interact = True

    def __init__(self, names: Sequence[str], device: str = "cpu", seed: int = 0,
                 lr: float = 1e-4, pretrained: str | None = None, trainable: bool = True,
                 **loss_options: Any):
        if len(names) != 1:
            raise MMGuardError("contrastive methods take one --surrogate (ensembles come with "
                               "the LVLM surrogates)")
        if loss_options:
            raise MMGuardError(f"{', '.join(loss_options)} apply to LVLM surrogates, not to "
                               f"the contrastive {names[0]}")
        self.names = list(names)
        torch.manual_seed(seed)
        self.model: ContrastiveModel = create_contrastive_model(names[0], pretrained, device)
        self.device = torch.device(device)
        self.trainable = trainable
        self.trainer = Trainer(self.model.parameters(), lr=lr, weight_decay=0.2)

    # -- texts ---------------------------------------------------------------------
    def ids(self, texts: Sequence[TextItem]) -> torch.Tensor:
        """(B, context) token ids of each trigger followed by its caption."""
        for item in texts:
            if item.trigger and item.position != "start":
                raise MMGuardError("contrastive surrogates put the trigger before the caption "
                                   f"(position start), not at {item.position!r}")
        return torch.stack([self.model.compose_ids(list(item.trigger),
                                                   self.model.text_token_ids(item.text))
                            for item in texts])

    # -- inner minimisation --------------------------------------------------------
    def train_step(self, images: Images, texts: Sequence[TextItem]) -> float:
        self.model.train()
        return self.trainer.step(self._loss(images, self.ids(texts)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) if self.trainable else []

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "trainer": self.trainer.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])

    @contextlib.contextmanager
    def perturbation_mode(self, batch_statistics: bool = False) -> Iterator[None]:
        model = self.model
        if not batch_statistics:
            model.eval()
            yield
            return
        norms = batchnorm_layers(model)
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

    # -- losses ----------------------------------------------------------------------
    def _loss(self, images: Images, ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        pixels = model.preprocess([image.to(self.device) for image in images])
        return info_nce(model.logits(model.encode_pixels(pixels),
                                     model.encode_text(ids.to(self.device))))

    def noise_loss(self, texts: Sequence[TextItem],
                   reference: Any = None) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        model = self.model
        # The texts stay fixed during PGD: their features are computed once.
        text_features = encode_text_chunked(model, self.ids(texts).to(self.device))

        def loss(images: list[torch.Tensor]) -> torch.Tensor:
            return info_nce(model.logits(model.encode_images(images), text_features))

        return loss

    def image_features(self, images: Images) -> torch.Tensor:
        model = self.model
        return model.image_tower_features(model.preprocess([image.to(self.device)
                                                            for image in images]))

    @torch.no_grad()
    def measure(self, images: Images, texts: Sequence[TextItem],
                reference: Any = None) -> dict[str, float]:
        self.model.eval()
        return {"train_loss": float(self._loss(images, self.ids(texts)))}

    # -- triggers --------------------------------------------------------------------
    def trigger_search(self, images: Images, texts: Sequence[TextItem],
                       reference: Any = None) -> ContrastiveTriggerSearch:
        return ContrastiveTriggerSearch(self, images, texts)

    def trigger_vocabulary(self, natural: bool, size: int | None, seed: int) -> torch.Tensor:
        return trigger_vocabulary(self.model, natural, size, seed)

    def initial_trigger(self, length: int) -> list[int]:
        return self.model.text_token_ids(INITIAL_TRIGGER_WORD) * length

    def decode_trigger(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def embedding_matrix(self) -> torch.Tensor:
        return self.model.token_embeddings.weight.detach()


class ContrastiveTriggerSearch:
    """HotFlip on a contrastive batch: image features are computed once, and every
    candidate's exact batch loss comes from replacing one column of the logits."""

    def __init__(self, surrogate: ContrastiveSurrogate, images: Images,
                 texts: Sequence[TextItem]):
        model, device = surrogate.model, surrogate.device
        self.model, self.device = model, device
        self.length = len(texts[0].trigger)
        self.offset = model.trigger_offset
        self.base_ids = surrogate.ids(texts).to(device)
        with torch.no_grad():
            self.image_features = model.encode_images(list(images))
        self.embeddings = model.token_embeddings(self.base_ids).detach().requires_grad_(True)
        self.text_features = model.encode_text(self.base_ids, replace_embeddings=self.embeddings)
        with torch.no_grad():
            self.current_logits = model.logits(self.image_features, self.text_features.detach())

    def gradients(self) -> torch.Tensor:
        loss = info_nce(self.model.logits(self.image_features, self.text_features))
        (grads,) = torch.autograd.grad(loss, self.embeddings)
        return grads[:, self.offset:self.offset + self.length]

    def _with_triggers(self, rows: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
        ids = self.base_ids[rows.to(self.device)].clone()
        ids[:, self.offset:self.offset + self.length] = triggers.to(self.device)
        return ids

    @torch.no_grad()
    def score(self, rows: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
        model = self.model
        columns = model.logits(self.image_features,
                               encode_text_chunked(model, self._with_triggers(rows, triggers)))
        return torch.cat([
            replaced_column_losses(self.current_logits, row_chunk.to(self.device), column_chunk)
            for row_chunk, column_chunk in zip(rows.split(256), columns.split(256, dim=1),
                                               strict=True)
        ]).cpu()

    @torch.no_grad()
    def joint(self, triggers: torch.Tensor) -> float:
        ids = self.base_ids.clone()
        ids[:, self.offset:self.offset + self.length] = triggers.to(self.device)
        return float(info_nce(self.model.logits(self.image_features,
                                                encode_text_chunked(self.model, ids))))


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
