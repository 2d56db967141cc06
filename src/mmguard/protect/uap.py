"""UAP: error-maximising (adversarial) noise on a clean-trained surrogate (Fowl et al. 2021)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmguard.models.contrastive import info_nce
from mmguard.protect.base import DatasetView, ProtectedItem, ProtectionItem, ProtectionMethod
from mmguard.protect.contrastive_surrogate import (
    checkpoint_surrogate,
    encode_text_chunked,
    restore_surrogate,
)
from mmguard.protect.pgd import pgd
from mmguard.protect.state import PerturbationStore


class ErrorMaximizing(ProtectionMethod):
    """max over delta of InfoNCE(x + delta, caption) on a surrogate trained on clean pairs.

    The surrogate first trains `clean_epochs` (10) epochs on the clean data;
    then each batch gets `pgd_steps` PGD *ascent* steps with the true captions.
    MEM (Liu et al. 2024, Table 1) finds this barely protects image-caption
    data; it is here as the paper's baseline.

    Settings: eps (8/255), step_size (1/255), pgd_steps (8), clean_epochs (10),
    batch_size, surrogates (["rn-tiny"]), surrogate_lr (1e-4).

    Example:
        mmguard protect --dataset emoji --method uap --out out/
    """

    name = "uap"
    summary = "error-maximising noise on a clean-trained surrogate"
    uses = frozenset({"device", "batch_size", "surrogates", "surrogate_pretrained", "pgd_steps",
                      "step_size", "clean_epochs", "surrogate_lr"})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "surrogates": list(self.settings.surrogates) or ["rn-tiny"]}

    def prepare(self, data: DatasetView, workdir: Path) -> None:
        settings = self.settings
        self.store = PerturbationStore(workdir)
        self.surrogate = restore_surrogate(settings, self.store)
        model = self.surrogate.model
        progress = self.store.read_json("progress.json", {"epochs": 0, "losses": [],
                                                          "perturbed": False})
        self.progress = progress
        for epoch in range(progress["epochs"], settings.clean_epochs):
            losses = []
            for items in self._batches(data, epoch):
                losses.append(self.surrogate.train_step([i.image for i in items],
                                                        self._ids(items)))
            progress["epochs"] = epoch + 1
            progress["losses"].append(round(sum(losses) / max(1, len(losses)), 5))
            checkpoint_surrogate(self.surrogate, self.store)
            self.store.write_json("progress.json", progress)
        if progress["perturbed"]:
            return
        model.eval()
        device = self.surrogate.device
        for items in self._batches(data, epoch=-1):
            originals = [item.image.to(device) for item in items]
            text_features = encode_text_chunked(model, self._ids(items).to(device))

            def loss_fn(images, text_features=text_features):
                return info_nce(model.logits(model.encode_images(images), text_features))

            zeros = [torch.zeros_like(x) for x in originals]
            deltas = pgd(originals, zeros, loss_fn, eps=settings.eps,
                         step_size=settings.step_size, steps=settings.pgd_steps, maximize=True)
            for item, delta in zip(items, deltas, strict=True):
                self.store.save_delta(item.key, delta)
        progress["perturbed"] = True
        self.store.write_json("progress.json", progress)

    def _batches(self, data: DatasetView, epoch: int):
        order = list(range(len(data.keys)))
        if epoch >= 0:
            generator = torch.Generator().manual_seed(self.settings.seed * 1000 + epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            items = data.load([data.keys[i] for i in order[start:start + size]])
            if len(items) >= 2:
                yield items

    def _ids(self, items: list[ProtectionItem]) -> torch.Tensor:
        return self.surrogate.model.tokenize([item.texts[0] for item in items])

    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        return [ProtectedItem((item.image + self.store.delta(item.key, item.image.shape))
                              .clamp(0.0, 1.0)) for item in batch]

    def report(self) -> dict[str, Any]:
        return {"surrogate": self.surrogate.name, "clean_epoch_losses": self.progress["losses"]}
