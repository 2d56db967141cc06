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

import math

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


# -- the paper's exact binding losses (MMGuard Eqs 21-29) -------------------------------
# These read the head-averaged attention of the first |K| layers separately
# (a list of (B, L, L) maps), not the mean over all layers.

TINY = 1e-12  # floor inside log: a key with no attention costs log(1e-12), not infinity


def mean_query_rows(attention: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(B, L) Ā(S): one layer's attention (B, L, L) averaged over the query rows in S."""
    return _mean_over(queries, attention)


def attention_mass_loss(layers: list[torch.Tensor], queries: torch.Tensor,
                        keys: torch.Tensor) -> torch.Tensor:
    """(B,) ℓ_mass(S, R) (Eqs 24-26): mean over layers of KL(U_R ‖ Ā_k(S)).

    U_R is uniform on the keys R, so the KL is -log|R| - mean_{r in R} log Ā_k,r(S):
    a multi-positive softmax loss in which every key outside R is a negative. An
    example whose S or R is empty contributes 0.
    """
    weights = keys.to(layers[0].dtype)
    count = weights.sum(dim=1)
    per_layer = []
    for attention in layers:
        rows = mean_query_rows(attention, queries)
        mean_log = (torch.log(rows.clamp(min=TINY)) * weights).sum(dim=1) / count.clamp(min=1)
        per_layer.append(-mean_log - torch.log(count.clamp(min=1)))
    loss = torch.stack(per_layer).mean(dim=0)
    valid = (count > 0) & queries.any(dim=1)
    return torch.where(valid, loss, torch.zeros_like(loss))


def bph_exact_loss(layers: list[torch.Tensor], batch: EncodedBatch,
                   perturbation_keys: torch.Tensor) -> torch.Tensor:
    """(B,) BPH (Eq 27): ℓ_mass(Ωγ→Ωδ) + ℓ_mass(Ωy→Ωγ) + ℓ_mass(Ωy→Ωδ), unit weights.

    The trigger attends to the perturbation tokens Ωδ, the answer to the trigger
    and to Ωδ; all other keys (the question, the other image tokens) are negatives.
    """
    answers, trigger = answer_positions(batch.labels), batch.roles == TRIGGER
    return (attention_mass_loss(layers, trigger, perturbation_keys)
            + attention_mass_loss(layers, answers, trigger)
            + attention_mass_loss(layers, answers, perturbation_keys))


def answer_rows(layers: list[torch.Tensor], batch: EncodedBatch) -> list[torch.Tensor]:
    """Per layer, (B, L) Ā_k(Ωy): the answer queries' mean attention over the keys."""
    answers = answer_positions(batch.labels)
    return [mean_query_rows(attention, answers) for attention in layers]


def align_to_protected(clean_rows: list[torch.Tensor], clean: EncodedBatch,
                       protected: EncodedBatch) -> list[torch.Tensor]:
    """Clean-input distributions moved onto the protected sequence's positions.

    The protected text is the clean one with the trigger inserted, so the clean
    keys map, in order, onto the protected keys that are not trigger tokens; the
    trigger positions get mass 0 (the paper's zero-padded common universe). If
    re-tokenisation around the trigger changed the count, the surplus is cut and
    the row renormalised.
    """
    aligned = []
    for rows in clean_rows:
        out = torch.zeros(protected.roles.shape, dtype=rows.dtype, device=rows.device)
        for b in range(rows.shape[0]):
            source = clean.attention_mask[b].bool().nonzero()[:, 0]
            target = ((protected.attention_mask[b] == 1)
                      & (protected.roles[b] != TRIGGER)).nonzero()[:, 0]
            n = min(len(source), len(target))
            values = rows[b, source[:n].to(rows.device)]
            out[b, target[:n].to(rows.device)] = values / values.sum().clamp(min=EPS)
        aligned.append(out)
    return aligned


def crs_kl_loss(layers: list[torch.Tensor], batch: EncodedBatch,
                clean_rows: list[torch.Tensor]) -> torch.Tensor:
    """(B,) CRS (Eq 29): -mean_k KL(sg(Ā^clean_k(Ωy)) ‖ Ā^prot_k(Ωy)), unbounded.

    `clean_rows` are the clean input's answer rows aligned to this batch's positions
    (`align_to_protected`); they carry no gradient.
    """
    per_layer = []
    for reference, protected in zip(clean_rows, answer_rows(layers, batch), strict=True):
        reference = reference.detach()
        kl = (reference * (torch.log(reference.clamp(min=TINY))
                           - torch.log(protected.clamp(min=TINY)))).sum(dim=1)
        per_layer.append(kl)
    return -torch.stack(per_layer).mean(dim=0)


def perturbation_tokens(change: list[torch.Tensor], roles: torch.Tensor,
                        share: float) -> torch.Tensor:
    """(B, L) mask of Ωδ (Eqs 21-23): per example, the top ⌈share·|Ωx|⌉ image tokens
    ranked by ρ, the mean |δ| over the preprocessed pixels each token covers.

    `change[b]` holds ρ for example b's image tokens, in their order in the sequence.
    """
    mask = torch.zeros(roles.shape, dtype=torch.bool, device=roles.device)
    for b, rho in enumerate(change):
        positions = (roles[b] == IMAGE).nonzero()[:, 0]
        if len(positions) != len(rho):
            raise ValueError(f"example {b}: {len(positions)} image tokens, {len(rho)} regions")
        count = min(len(rho), max(1, math.ceil(share * len(rho))))
        chosen = rho.topk(count).indices.to(positions.device)
        mask[b, positions[chosen]] = True
    return mask
