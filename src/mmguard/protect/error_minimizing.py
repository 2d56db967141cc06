"""The bilevel error-minimising loop shared by EM and MEM (contrastive models).

Per round, over the dataset in shuffled batches: (1) train the surrogate on the
current protected pairs; (2) with a trigger, update each image's trigger by
HotFlip while image features stay fixed; (3) update the noise by PGD descent
while text features stay fixed. MEM pairs each image with a caption shuffled
within the batch plus the image's own trigger in step (3), so the noise binds
to the trigger rather than to the caption's meaning; EM uses the true caption
and no trigger. The loop stops when the mean training loss on the protected
pairs falls below `stop_loss`, or after `rounds`.

Memory follows the batch: noise and triggers live in the work folder, the
surrogate and round counter are checkpointed after every round.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from mmguard.models.contrastive import ContrastiveModel, info_nce
from mmguard.protect.base import DatasetView, ProtectedItem, ProtectionItem, ProtectionMethod
from mmguard.protect.contrastive_surrogate import (
    checkpoint_surrogate,
    encode_text_chunked,
    perturbation_mode,
    replaced_column_losses,
    restore_surrogate,
)
from mmguard.protect.hotflip import hotflip_candidates, update_triggers
from mmguard.protect.pgd import pgd
from mmguard.protect.seeding import item_generator
from mmguard.protect.state import PerturbationStore
from mmguard.protect.triggers import trigger_vocabulary

INITIAL_TRIGGER_WORD = "the"  # MEM initialises every trigger as "the the the"


class ContrastiveErrorMinimizing(ProtectionMethod):
    """Base of EM and MEM; subclasses set `trigger_len_default` and `shuffle_captions`."""

    uses = frozenset({"device", "batch_size", "surrogates", "surrogate_pretrained", "rounds",
                      "pgd_steps", "step_size", "train_steps", "stop_loss", "surrogate_lr",
                      "surrogate_bn"})
    shuffle_captions = False
    trigger_len_default = 0

    @property
    def trigger_len(self) -> int:
        length = self.settings.trigger_len
        return self.trigger_len_default if length is None else length

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["surrogates"] = list(self.settings.surrogates) or ["rn-tiny"]
        if self.trigger_len:
            described["trigger_len"] = self.trigger_len
        return described

    # -- whole-dataset optimisation ------------------------------------------
    def reset_noise_stats(self) -> None:
        """Start a round's tally of |delta| and of values at the bound (for the run record)."""
        self._noise_stats = {"sum_abs": 0.0, "at_bound": 0, "count": 0}

    def prepare(self, data: DatasetView, workdir: Path) -> None:
        settings = self.settings
        self.store = PerturbationStore(workdir)
        self.surrogate = restore_surrogate(settings, self.store)
        model = self.surrogate.model
        progress = self.store.read_json("progress.json", {"round": 0, "history": []})
        self.history: list[dict[str, Any]] = progress["history"]
        self.triggers: dict[str, list[int]] = self.store.read_json("triggers.json", {})
        if self.trigger_len:
            self.allowed = trigger_vocabulary(model, settings.natural_triggers,
                                              settings.trigger_vocab, settings.seed)
            start = model.text_token_ids(INITIAL_TRIGGER_WORD)
            for key in data.keys:
                self.triggers.setdefault(key, start * self.trigger_len)
        finished = bool(self.history) and self.history[-1]["mean_loss"] < settings.stop_loss
        trigger_rounds = settings.trigger_rounds
        if trigger_rounds is None:
            trigger_rounds = max(1, math.ceil(settings.rounds / 2))
        for round_index in range(progress["round"], settings.rounds):
            if finished:
                break
            started = time.monotonic()
            order = torch.randperm(len(data.keys),
                                   generator=torch.Generator().manual_seed(settings.seed * 1000
                                                                           + round_index))
            losses, trigger_changes = [], 0
            self.reset_noise_stats()
            for start_index in range(0, len(order), settings.batch_size):
                keys = [data.keys[i] for i in order[start_index:start_index + settings.batch_size]]
                items = data.load(keys)
                if len(items) < 2:
                    continue  # a contrastive loss needs negatives
                update_trigger = bool(self.trigger_len) and round_index < trigger_rounds
                loss, changed = self._optimise_batch(items, round_index, update_trigger)
                losses.append(loss)
                trigger_changes += changed
            mean_loss = sum(losses) / max(1, len(losses))
            stats = self._noise_stats
            count = max(1, stats["count"])
            self.history.append({"round": round_index + 1, "mean_loss": round(mean_loss, 5),
                                 "trigger_changes": trigger_changes,
                                 "mean_abs_delta_levels": round(255 * stats["sum_abs"] / count, 3),
                                 "share_at_bound": round(stats["at_bound"] / count, 4),
                                 "seconds": round(time.monotonic() - started, 1)})
            checkpoint_surrogate(self.surrogate, self.store)
            self.store.write_json("triggers.json", self.triggers)
            self.store.write_json("progress.json", {"round": round_index + 1,
                                                    "history": self.history})
            finished = mean_loss < settings.stop_loss

    def _optimise_batch(self, items: list[ProtectionItem], round_index: int,
                        update_trigger: bool) -> tuple[float, int]:
        settings, model = self.settings, self.surrogate.model
        device = self.surrogate.device
        originals = [item.image.to(device) for item in items]
        deltas = [self.store.delta(item.key, item.image.shape).to(device) for item in items]
        generator = item_generator(settings.seed, f"round {round_index} {items[0].key}")
        caption_ids = [model.text_token_ids(self._pick_caption(item, generator))
                       for item in items]
        triggers = torch.tensor([self.triggers.get(item.key, []) for item in items],
                                dtype=torch.long).reshape(len(items), self.trigger_len)
        true_ids = _compose(model, triggers, caption_ids)
        # (1) the surrogate learns the current protected pairs
        perturbed = [x + d for x, d in zip(originals, deltas, strict=True)]
        for _ in range(settings.train_steps):
            self.surrogate.train_step(perturbed, true_ids)
        with perturbation_mode(model, settings.surrogate_bn == "batch"):
            changed = 0
            # (2) triggers, with image features computed once
            if update_trigger:
                new_triggers = self._hotflip(model, perturbed, triggers, caption_ids)
                changed = int((new_triggers != triggers).any(dim=1).sum())
                triggers = new_triggers
                for item, trigger in zip(items, triggers.tolist(), strict=True):
                    self.triggers[item.key] = trigger
                true_ids = _compose(model, triggers, caption_ids)
            # (3) noise, with text features computed once
            deltas = self._noise_step(originals, deltas, triggers, caption_ids, true_ids,
                                      generator)
        bound = settings.eps - 0.5 / 255  # within half a level of the budget
        for item, delta in zip(items, deltas, strict=True):
            self.store.save_delta(item.key, delta)
            self._noise_stats["sum_abs"] += float(delta.abs().sum())
            self._noise_stats["at_bound"] += int((delta.abs() >= bound).sum())
            self._noise_stats["count"] += delta.numel()
        loss = self.surrogate.loss([x + d for x, d in zip(originals, deltas, strict=True)],
                                   true_ids)
        return loss, changed

    def _noise_step(self, originals, deltas, triggers, caption_ids, true_ids, generator):
        settings, model = self.settings, self.surrogate.model
        if self.shuffle_captions:
            shuffled = torch.randperm(len(originals), generator=generator).tolist()
            pgd_ids = _compose(model, triggers, [caption_ids[j] for j in shuffled])
        else:
            pgd_ids = true_ids
        text_features = encode_text_chunked(model, pgd_ids.to(self.surrogate.device))

        def loss_fn(images: list[torch.Tensor]) -> torch.Tensor:
            return info_nce(model.logits(model.encode_images(images), text_features))

        return pgd(originals, deltas, loss_fn, eps=settings.eps, step_size=settings.step_size,
                   steps=settings.pgd_steps)

    @staticmethod
    def _pick_caption(item: ProtectionItem, generator: torch.Generator) -> str:
        if len(item.texts) == 1:
            return item.texts[0]
        return item.texts[int(torch.randint(len(item.texts), (1,), generator=generator))]

    def _hotflip(self, model: ContrastiveModel, perturbed: list[torch.Tensor],
                 triggers: torch.Tensor, caption_ids: list[list[int]]) -> torch.Tensor:
        device, offset, length = self.surrogate.device, model.trigger_offset, self.trigger_len
        base_ids = _compose(model, triggers, caption_ids).to(device)
        with torch.no_grad():
            image_features = model.encode_images(perturbed)
        embeddings = model.token_embeddings(base_ids).detach().requires_grad_(True)
        text_features = model.encode_text(base_ids, replace_embeddings=embeddings)
        loss = info_nce(model.logits(image_features, text_features))
        (grads,) = torch.autograd.grad(loss, embeddings)
        candidates = hotflip_candidates(grads[:, offset:offset + length],
                                        model.token_embeddings.weight.detach(),
                                        self.allowed.to(device), self.settings.top_k).cpu()
        with torch.no_grad():
            current_logits = model.logits(image_features, text_features.detach())

            def with_triggers(owners: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
                ids = base_ids[owners.to(device)].clone()
                ids[:, offset:offset + length] = new.to(device)
                return ids

            def score(owners: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
                columns = model.logits(image_features,
                                       encode_text_chunked(model, with_triggers(owners, new)))
                return torch.cat([
                    replaced_column_losses(current_logits, owner_chunk.to(device), column_chunk)
                    for owner_chunk, column_chunk in zip(owners.split(256),
                                                         columns.split(256, dim=1), strict=True)
                ]).cpu()

            def joint_loss(new: torch.Tensor) -> torch.Tensor:
                ids = base_ids.clone()
                ids[:, offset:offset + length] = new.to(device)
                return info_nce(model.logits(image_features, encode_text_chunked(model, ids)))

            updated, _, _ = update_triggers(triggers, candidates, score, joint_loss,
                                            self.settings.beam_width)
        return updated

    # -- output ---------------------------------------------------------------
    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        model = self.surrogate.model
        protected = []
        for item in batch:
            delta = self.store.delta(item.key, item.image.shape)
            trigger = None
            if self.trigger_len:
                trigger = model.decode(self.triggers[item.key])
            protected.append(ProtectedItem((item.image + delta).clamp(0.0, 1.0), trigger))
        return protected

    def report(self) -> dict[str, Any]:
        return {"surrogate": self.surrogate.name, "rounds": self.history}


def _compose(model: ContrastiveModel, triggers: torch.Tensor,
             caption_ids: list[list[int]]) -> torch.Tensor:
    return torch.stack([model.compose_ids(trigger, ids)
                        for trigger, ids in zip(triggers.tolist(), caption_ids, strict=True)])
