"""LVLM surrogates: one generative vision-language model, or an ensemble of them.

The loss of a batch is, per example and averaged over the members, the
response-only training loss plus `binding_weight` times a binding-disruption
loss on the language model's attention (`binding`: "bph", "crs" or "none",
see `protect/binding.py`). Each member processes the images with its own
differentiable processor and re-tokenises the released text itself, so members
may be different families with different tokenisers; trigger ids are those of
the first member (the primary), and only members with the same vocabulary
contribute trigger gradients.

With `trainable`, the members' projectors are trained on the protected data
between perturbation updates (EM's inner minimisation); the towers stay frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import TRIGGER, EncodedBatch, LVLMAdapter, TextExample
from mmguard.models.lvlm.lora import inject_lora
from mmguard.models.lvlm.registry import create_lvlm
from mmguard.models.training import Trainer
from mmguard.protect.binding import (
    align_to_protected,
    answer_rows,
    bph_exact_loss,
    bph_loss,
    crs_kl_loss,
    crs_loss,
    perturbation_tokens,
    routing_profile,
)
from mmguard.protect.surrogates.base import Images, Surrogate, TextItem
from mmguard.protect.triggers import lvlm_trigger_vocabulary

# bph, crs: our simplified losses on the attention averaged over all layers;
# bph-exact, crs-kl: the paper's Eqs 27 and 29 on the first `binding_layers` layers.
BINDINGS = ("bph", "crs", "none", "bph-exact", "crs-kl")
EXACT_BINDINGS = ("bph-exact", "crs-kl")
OBJECTIVES = ("min", "max")
INNER_RANK, INNER_DROPOUT, INNER_BATCH = 8, 0.1, 2
INITIAL_TRIGGER_WORD = " the"
SCORE_CHUNK = 16  # candidate examples per no-grad forward
REJECTED = float("inf")


@dataclass
class MemberReference:
    """What one member's binding loss compares a protected input with."""

    profile: torch.Tensor | None = None  # crs: clean answer-attention profile (B, bins)
    clean_images: list[torch.Tensor] | None = None  # bph-exact: ρ is the change from these
    clean_rows: list[torch.Tensor] | None = None  # crs-kl: per layer, clean Ā_k(Ωy) (B, L)
    clean_batch: EncodedBatch | None = None  # crs-kl: the clean sequences of those rows

    def select(self, rows: list[int]) -> MemberReference:
        """The reference of a subset of the batch's examples (in this order)."""
        batch = self.clean_batch
        return MemberReference(
            None if self.profile is None else self.profile[rows],
            None if self.clean_images is None else [self.clean_images[i] for i in rows],
            None if self.clean_rows is None else [r[rows] for r in self.clean_rows],
            None if batch is None else EncodedBatch(batch.input_ids[rows],
                                                    batch.attention_mask[rows],
                                                    batch.labels[rows], batch.roles[rows]))


Profiles = list[MemberReference]  # one per member


class LVLMSurrogate(Surrogate):
    family = "lvlm"
    items_interact = False

    def __init__(self, names: Sequence[str], device: str = "cpu", seed: int = 0,
                 lr: float = 1e-4, pretrained: str | None = None, trainable: bool = False,
                 binding: str = "none", binding_weight: float = 0.0,
                 binding_layers: int = 2, perturbation_share: float = 0.25,
                 objective: str = "min", inner_steps: int = 0, inner_lr: float = 1e-4):
        if binding not in BINDINGS:
            raise MMGuardError(f"--binding {binding!r}: choose {', '.join(BINDINGS)}")
        if objective not in OBJECTIVES:
            raise MMGuardError(f"--objective {objective!r}: choose {', '.join(OBJECTIVES)}")
        if binding_layers < 1 or not 0 < perturbation_share <= 1:
            raise MMGuardError("--binding-layers must be at least 1 and --perturbation-share "
                               "in (0, 1]")
        self.binding_layers, self.perturbation_share = binding_layers, perturbation_share
        # -Max (Eq 32): the training loss is maximised while the binding loss is minimised.
        self.train_sign = -1.0 if objective == "max" else 1.0
        if pretrained:
            raise MMGuardError("--surrogate-pretrained applies to contrastive surrogates; an "
                               "LVLM starts from its registry checkpoint")
        self.names = list(names)
        self.binding, self.binding_weight = binding, binding_weight
        self.members: list[LVLMAdapter] = [create_lvlm(name, device, seed=seed)
                                           for name in self.names]
        for member in self.members:
            member.model.requires_grad_(False)
        self.trainers: list[Trainer] = []
        if trainable:
            for member in self.members:
                parameters = member.trainable_parameters("projector")
                for parameter in parameters:
                    parameter.requires_grad_(True)
                self.trainers.append(Trainer(parameters, lr=lr))
        # Inner adaptation (MMGuard section 5): LoRA rank 8, dropout 0.1, on the language
        # model's attention and MLP projections, lr 1e-4, mini-batches of 2; reset every round.
        self.inner_steps = inner_steps
        self.inner: list[tuple[list[nn.Parameter], list[torch.Tensor], Trainer]] = []
        for member in self.members if inner_steps else []:
            weights = inject_lora(member, rank=INNER_RANK, alpha=2 * INNER_RANK,
                                  dropout=INNER_DROPOUT, include_mlp=True)
            self.inner.append((weights, [w.detach().clone() for w in weights],
                               Trainer(weights, lr=inner_lr)))

    @property
    def primary(self) -> LVLMAdapter:
        """The member whose tokeniser defines trigger token ids."""
        return self.members[0]

    def shares_vocabulary(self, member: LVLMAdapter) -> bool:
        """Whether `member`'s embedding gradients can rank the primary's token ids."""
        return member.tokenizer.get_vocab() == self.primary.tokenizer.get_vocab()

    @property
    def uses_attention(self) -> bool:
        return self.binding != "none" and self.binding_weight > 0

    def examples(self, texts: Sequence[TextItem]) -> list[TextExample]:
        return [TextExample(item.text, item.response,
                            self.decode_trigger(item.trigger) if item.trigger else None,
                            item.position) for item in texts]

    # -- inner minimisation ----------------------------------------------------------
    def train_step(self, images: Images, texts: Sequence[TextItem]) -> float:
        """Each member's projector learns the protected batch."""
        examples = self.examples(texts)
        losses = []
        for member, trainer in zip(self.members, self.trainers, strict=True):
            member.model.train()
            loss = member.loss([image.detach() for image in images], examples).loss.mean()
            losses.append(trainer.step(loss))
            member.model.eval()
        return sum(losses) / max(1, len(losses))

    def adapt(self, images: Images, texts: Sequence[TextItem]) -> float | None:
        """`inner_steps` LoRA steps on the protected batch, two examples at a time."""
        if not self.inner_steps:
            return None
        examples, losses = self.examples(texts), []
        for step in range(self.inner_steps):
            rows = [(step * INNER_BATCH + i) % len(examples)
                    for i in range(min(INNER_BATCH, len(examples)))]
            for member, (_, _, trainer) in zip(self.members, self.inner, strict=True):
                member.model.train()
                loss = member.loss([images[r].detach() for r in rows],
                                   [examples[r] for r in rows]).loss.mean()
                losses.append(trainer.step(loss))
                member.model.eval()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def end_round(self) -> None:
        for weights, initial, trainer in self.inner:
            for weight, start in zip(weights, initial, strict=True):
                weight.copy_(start)
            trainer.optimizer.state.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for trainer in self.trainers for p in trainer.parameters]

    def state(self) -> dict[str, Any]:
        # Only what the bilevel steps train (the projectors): not the frozen towers, nor
        # the inner LoRA weights, which are reset every round anyway.
        trained = {id(p) for p in self.trainable_parameters()}
        return {"projectors": [{name: p.detach().cpu() for name, p
                                in member.model.named_parameters() if id(p) in trained}
                               for member in self.members] if self.trainers else [],
                "trainers": [trainer.state_dict() for trainer in self.trainers]}

    def load(self, state: dict[str, Any]) -> None:
        for member, saved in zip(self.members, state.get("projectors", []), strict=False):
            member.model.load_state_dict(saved, strict=False)
        for trainer, saved in zip(self.trainers, state.get("trainers", []), strict=False):
            trainer.load_state_dict(saved)

    # -- losses ------------------------------------------------------------------------
    @torch.no_grad()
    def reference(self, clean: Images, texts: Sequence[TextItem]) -> Profiles:
        """Per member, what the binding loss needs from the clean input: the answer's
        attention there (CRS) or the clean images (the exact BPH's ρ)."""
        if not self.uses_attention or self.binding == "bph":
            return self._profiles(None)
        if self.binding == "bph-exact":
            return [MemberReference(clean_images=list(clean)) for _ in self.members]
        plain = [TextExample(item.text, item.response, None, item.position) for item in texts]
        references = []
        for member in self.members:
            pixels = member.pixel_inputs(clean)
            batch = member.encode(plain, pixels)
            if self.binding == "crs":
                output = member.forward(batch, pixels, output_attentions=True)
                references.append(MemberReference(
                    profile=routing_profile(output.attention, batch.to(member.device))))
            else:
                output = member.forward(batch, pixels, output_attentions=True,
                                        attention_layers=self.binding_layers)
                batch = batch.to(member.device)
                references.append(MemberReference(
                    clean_rows=answer_rows(output.layer_attentions, batch), clean_batch=batch))
        return references

    def _profiles(self, reference: Profiles | None) -> Profiles:
        return [MemberReference() for _ in self.members] if reference is None else reference

    def member_loss(self, index: int, images: Images, examples: Sequence[TextExample],
                    reference: MemberReference) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) loss of one member, and its parts (detached means) for the log."""
        member = self.members[index]
        pixels = member.pixel_inputs(images)
        batch = member.encode(examples, pixels)
        exact = self.binding in EXACT_BINDINGS
        output = member.forward(batch, pixels, output_attentions=self.uses_attention,
                                attention_layers=self.binding_layers if exact else None)
        value = self.train_sign * output.loss
        parts = {"train_loss": float(output.loss.detach().mean())}
        if self.uses_attention:
            batch = batch.to(member.device)
            if self.binding == "bph":
                binding = bph_loss(output.attention, batch)
            elif self.binding == "crs":
                binding = crs_loss(output.attention, batch, reference.profile)
            elif self.binding == "bph-exact":
                change = member.image_token_change(member.pixel_inputs(reference.clean_images),
                                                   pixels)
                omega = perturbation_tokens(change, batch.roles, self.perturbation_share)
                binding = bph_exact_loss(output.layer_attentions, batch, omega)
            else:
                aligned = align_to_protected(reference.clean_rows, reference.clean_batch, batch)
                binding = crs_kl_loss(output.layer_attentions, batch, aligned)
            value = value + self.binding_weight * binding
            parts["binding_loss"] = float(binding.detach().mean())
        return value, parts

    def per_item_loss(self, images: Images, examples: Sequence[TextExample],
                      profiles: Profiles) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) mean loss over the members (on the primary's device), and its parts."""
        total, parts = None, {}
        for index in range(len(self.members)):
            value, member_parts = self.member_loss(index, images, examples, profiles[index])
            value = value.to(self.primary.device)
            total = value if total is None else total + value
            for key, number in member_parts.items():
                parts[key] = parts.get(key, 0.0) + number / len(self.members)
        return total / len(self.members), parts

    def noise_loss(self, texts: Sequence[TextItem],
                   reference: Profiles | None = None) -> Callable[[list[torch.Tensor]],
                                                                  torch.Tensor]:
        examples, profiles = self.examples(texts), self._profiles(reference)

        def loss(images: list[torch.Tensor]) -> torch.Tensor:
            return self.per_item_loss(images, examples, profiles)[0].sum()

        return loss

    def image_features(self, images: Images) -> torch.Tensor:
        """Every member's vision features, side by side (on the primary's device)."""
        return torch.cat(self.image_feature_parts(images), dim=1)

    def image_feature_parts(self, images: Images) -> list[torch.Tensor]:
        return [member.vision_features(member.pixel_inputs(images)).to(self.primary.device)
                for member in self.members]

    @torch.no_grad()
    def measure(self, images: Images, texts: Sequence[TextItem],
                reference: Profiles | None = None) -> dict[str, float]:
        return self.per_item_loss(images, self.examples(texts), self._profiles(reference))[1]

    # -- triggers ----------------------------------------------------------------------
    def trigger_search(self, images: Images, texts: Sequence[TextItem],
                       reference: Profiles | None = None) -> LVLMTriggerSearch:
        return LVLMTriggerSearch(self, images, texts, self._profiles(reference))

    def trigger_vocabulary(self, natural: bool, size: int | None, seed: int) -> torch.Tensor:
        return lvlm_trigger_vocabulary(self.primary.tokenizer, natural, size, seed,
                                       self.primary.input_embeddings().num_embeddings)

    def initial_trigger(self, length: int) -> list[int]:
        start = self.primary.tokenizer(INITIAL_TRIGGER_WORD, add_special_tokens=False)
        return start["input_ids"] * length

    def decode_trigger(self, ids: Sequence[int]) -> str:
        return self.primary.decode_trigger(list(ids))

    def embedding_matrix(self) -> torch.Tensor:
        return self.primary.input_embeddings().weight.detach().cpu()


class LVLMTriggerSearch:
    """HotFlip on an LVLM batch: a candidate is decoded, inserted as text and
    re-tokenised; unless it tokenises back to the same ids it is rejected (inf),
    otherwise scored by the exact loss of its own example."""

    def __init__(self, surrogate: LVLMSurrogate, images: Images, texts: Sequence[TextItem],
                 profiles: Profiles):
        self.surrogate = surrogate
        self.images = [image.detach() for image in images]
        self.examples = surrogate.examples(texts)
        self.profiles = profiles
        self.length = len(texts[0].trigger)

    def gradients(self) -> torch.Tensor:
        """(B, k, E), summed over the members that share the primary's vocabulary."""
        surrogate, total = self.surrogate, None
        for index, member in enumerate(surrogate.members):
            if not surrogate.shares_vocabulary(member):
                continue
            pixels = member.pixel_inputs(self.images)
            batch = member.encode(self.examples, pixels)
            with member.embedding_gradients() as holder:
                value, _ = surrogate.member_loss(index, self.images, self.examples,
                                                 self.profiles[index])
                (grad,) = torch.autograd.grad(value.sum(), holder["embeds"])
            mask = batch.roles.to(grad.device) == TRIGGER
            picked = grad[mask].reshape(len(self.examples), self.length, -1).cpu()
            total = picked if total is None else total + picked
        return total

    def score(self, rows: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
        surrogate, primary = self.surrogate, self.surrogate.primary
        image_tokens = primary.pixel_inputs(self.images[:1]).tokens_per_image[0]
        scores = torch.full((len(rows),), REJECTED)
        valid = []
        for position, (row, ids) in enumerate(zip(rows.tolist(), triggers.tolist(),
                                                  strict=True)):
            example = self.examples[row]
            if primary.verify_trigger(example, ids, image_tokens):
                valid.append((position, row, TextExample(
                    example.prompt, example.response, primary.decode_trigger(ids),
                    example.trigger_position)))
        for start in range(0, len(valid), SCORE_CHUNK):
            chunk = valid[start:start + SCORE_CHUNK]
            owners = [row for _, row, _ in chunk]
            profiles = [reference.select(owners) for reference in self.profiles]
            with torch.no_grad():
                values, _ = surrogate.per_item_loss([self.images[o] for o in owners],
                                                    [e for _, _, e in chunk], profiles)
            for (position, _, _), value in zip(chunk, values.cpu().tolist(), strict=True):
                scores[position] = value
        return scores

    @torch.no_grad()
    def joint(self, triggers: torch.Tensor) -> float:
        texts = [TextExample(e.prompt, e.response, self.surrogate.decode_trigger(ids),
                             e.trigger_position)
                 for e, ids in zip(self.examples, triggers.tolist(), strict=True)]
        values, _ = self.surrogate.per_item_loss(self.images, texts, self.profiles)
        return float(values.mean())
