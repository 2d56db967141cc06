"""The surrogate LVLMs of MMGuard: one or an ensemble, and the objective on them.

The objective for a batch is, per example and averaged over the surrogates,
the response-only training loss plus `binding_weight` times the binding
disruption loss (BPH or CRS, see `binding.py`), so that minimising it makes
the (noise, trigger) pair an easy shortcut to the answer and routes the
answer's attention through it. Each surrogate processes the images with its
own differentiable processor and re-tokenises the released text itself, so
members may be different families with different tokenisers.

With `bilevel`, the surrogates' projectors take training steps on the current
protected batch between perturbation updates (EM's inner minimisation); their
state is checkpointed with the run so a killed run resumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import LVLMAdapter, TextExample
from mmguard.models.lvlm.registry import create_lvlm
from mmguard.protect.base import MethodSettings
from mmguard.protect.binding import bph_loss, crs_loss, routing_profile

DEFAULT_SURROGATE = "smolvlm-lite"
BINDINGS = ("bph", "crs", "none")


class SurrogateEnsemble:
    def __init__(self, settings: MethodSettings):
        if settings.binding not in BINDINGS:
            raise MMGuardError(f"--binding {settings.binding!r}: choose {', '.join(BINDINGS)}")
        self.settings = settings
        self.names = list(settings.surrogates) or [DEFAULT_SURROGATE]
        self.members: list[LVLMAdapter] = [create_lvlm(name, settings.device, seed=settings.seed)
                                           for name in self.names]
        for member in self.members:
            member.model.requires_grad_(False)
        self.optimizers = []
        if settings.bilevel:
            for member in self.members:
                parameters = member.trainable_parameters("projector")
                for parameter in parameters:
                    parameter.requires_grad_(True)
                self.optimizers.append(torch.optim.AdamW(parameters, lr=settings.surrogate_lr,
                                                         weight_decay=0.0))

    @property
    def primary(self) -> LVLMAdapter:
        """The member whose tokeniser defines trigger token ids."""
        return self.members[0]

    def shares_vocabulary(self, member: LVLMAdapter) -> bool:
        """Whether `member`'s embedding gradients can rank the primary's token ids."""
        return member.tokenizer.get_vocab() == self.primary.tokenizer.get_vocab()

    @property
    def uses_attention(self) -> bool:
        return self.settings.binding != "none" and self.settings.binding_weight > 0

    @torch.no_grad()
    def clean_profiles(self, images: Sequence[torch.Tensor],
                       examples: Sequence[TextExample]) -> list[torch.Tensor | None]:
        """Per member, the answer-attention profile on the clean input (CRS's reference)."""
        if self.settings.binding != "crs" or not self.uses_attention:
            return [None] * len(self.members)
        plain = [TextExample(e.prompt, e.response, None, e.trigger_position) for e in examples]
        profiles = []
        for member in self.members:
            pixels = member.pixel_inputs(images)
            batch = member.encode(plain, pixels)
            output = member.forward(batch, pixels, output_attentions=True)
            profiles.append(routing_profile(output.attention, batch.to(member.device)))
        return profiles

    def member_objective(self, index: int, images: Sequence[torch.Tensor],
                         examples: Sequence[TextExample],
                         clean_profile: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """(B,) objective of one member, and its parts (detached means) for the log."""
        member = self.members[index]
        pixels = member.pixel_inputs(images)
        batch = member.encode(examples, pixels)
        output = member.forward(batch, pixels, output_attentions=self.uses_attention)
        objective = output.loss
        parts = {"train_loss": float(output.loss.detach().mean())}
        if self.uses_attention:
            batch = batch.to(member.device)
            if self.settings.binding == "bph":
                binding = bph_loss(output.attention, batch)
            else:
                binding = crs_loss(output.attention, batch, clean_profile)
            objective = objective + self.settings.binding_weight * binding
            parts["binding_loss"] = float(binding.detach().mean())
        return objective, parts

    def objective(self, images: Sequence[torch.Tensor], examples: Sequence[TextExample],
                  clean_profiles: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, dict]:
        """(B,) mean objective over the members (on the first member's device)."""
        total, parts = None, {}
        for index in range(len(self.members)):
            value, member_parts = self.member_objective(index, images, examples,
                                                        clean_profiles[index])
            value = value.to(self.members[0].device)
            total = value if total is None else total + value
            for key, number in member_parts.items():
                parts[key] = parts.get(key, 0.0) + number / len(self.members)
        return total / len(self.members), parts

    def train_step(self, images: Sequence[torch.Tensor], examples: Sequence[TextExample]) -> float:
        """Bilevel inner step: each member's projector learns the protected batch."""
        losses = []
        for member, optimizer in zip(self.members, self.optimizers, strict=True):
            member.model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = member.loss([image.detach() for image in images], examples).loss.mean()
            loss.backward()
            optimizer.step()
            member.model.eval()
            losses.append(loss.item())
        return sum(losses) / max(1, len(losses))

    def state(self) -> dict:
        # Only what the inner steps train (the projectors), not the frozen towers.
        return {"projectors": [{name: p.detach().cpu() for name, p
                                in member.model.named_parameters() if p.requires_grad}
                               for member in self.members] if self.settings.bilevel else [],
                "optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load(self, state: dict) -> None:
        for member, saved in zip(self.members, state.get("projectors", []), strict=False):
            member.model.load_state_dict(saved, strict=False)
        for optimizer, saved in zip(self.optimizers, state.get("optimizers", []), strict=False):
            optimizer.load_state_dict(saved)
