"""Cross-modal binding disruption losses of MMGuard, from LVLM attention maps.

Both take the language model's attention (B, L, L), averaged over layers and
heads, rows = queries, and the encoded batch's token roles. "Answer queries"
are the positions whose hidden state predicts a response token (the last
template token and every response token but the last): where the model looks
while it produces the answer.

- BPH, Bridge Path Hijack: make the trigger tokens attend to the (perturbed)
  image tokens rather than to the question, and the answer queries attend to
  the trigger and image tokens rather than to the question. Each preference is
  a contrastive attention-mass loss, -log(bridge / (bridge + content)), so it
  is scale-free and bounded below by 0.
- CRS, Contrastive Routing Shift: push the answer queries' attention profile on
  the protected input away from the profile on the clean input, without saying
  where it should go. The profile is a distribution over keys aligned between
  the two inputs (each image token, then the prompt, trigger, template and
  answer groups); the loss is minus their Jensen-Shannon divergence.
"""

from __future__ import annotations

import torch

from mmguard.models.lvlm.attention import ROLE_GROUPS, key_group_mass
from mmguard.models.lvlm.base import (
    ANSWER,
    IMAGE,
    PROMPT,
    TEMPLATE,
    TRIGGER,
    EncodedBatch,
    answer_positions,
)

EPS = 1e-6
GROUPS = (PROMPT, TRIGGER, TEMPLATE, ANSWER)  # profile bins after the per-image-token ones


def _mean_over(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, L, ...) over the positions in mask (B, L); 0 where mask is empty."""
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights[..., None]
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _preference(bridge: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    return -torch.log((bridge + EPS) / (bridge + content + 2 * EPS))


def bph_loss(attention: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """(B,) Bridge Path Hijack loss; lower means the bridge path carries more attention."""
    mass = key_group_mass(attention, batch.roles)  # (B, L, group)
    to_image, to_prompt, to_trigger = (mass[..., ROLE_GROUPS.index(role)]
                                       for role in (IMAGE, PROMPT, TRIGGER))
    answers, trigger = answer_positions(batch.labels), batch.roles == TRIGGER
    answer_term = _mean_over(answers, _preference(to_image + to_trigger, to_prompt))
    trigger_term = _mean_over(trigger, _preference(to_image, to_prompt))
    return answer_term + trigger_term


def routing_profile(attention: torch.Tensor, batch: EncodedBatch,
                    image_bins: int | None = None) -> torch.Tensor:
    """(B, image_bins + 4) mean answer-query attention per image token and per group."""
    roles = batch.roles
    image = roles == IMAGE
    counts = image.sum(dim=1)
    bins = int(counts.max()) if image_bins is None else image_bins
    answers = answer_positions(batch.labels).to(attention.dtype)
    # mean over answer queries of each key's attention -> (B, L)
    per_key = _mean_over(answers, attention)
    index = (image.long().cumsum(dim=1) - 1).clamp(min=0)  # k-th image token of its row
    image_part = torch.zeros(per_key.shape[0], bins, dtype=per_key.dtype, device=per_key.device)
    image_part = image_part.scatter_add(1, index, per_key * image.to(per_key.dtype))
    groups = [(per_key * (roles == role).to(per_key.dtype)).sum(dim=1) for role in GROUPS]
    profile = torch.cat([image_part, torch.stack(groups, dim=1)], dim=1)
    return profile / profile.sum(dim=1, keepdim=True).clamp(min=EPS)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B,) Jensen-Shannon divergence (nats, at most ln 2) between row distributions."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return (a * (torch.log(a + EPS) - torch.log(b + EPS))).sum(dim=1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def crs_loss(attention: torch.Tensor, batch: EncodedBatch,
             clean_profile: torch.Tensor) -> torch.Tensor:
    """(B,) minus the JS divergence between protected and clean answer-attention profiles."""
    bins = clean_profile.shape[1] - len(GROUPS)
    return -js_divergence(routing_profile(attention, batch, bins), clean_profile)
