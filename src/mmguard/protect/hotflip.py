"""HotFlip trigger search: gradient-ranked candidates, then exact-loss beam search.

Ebrahimi et al. 2018 (HotFlip) rank replacement tokens by the first-order
change of the loss, (e' - e_i) . grad_i; Wallace et al. 2019 (universal
triggers) then score a few candidates per position with the real loss, left to
right, with a small beam. Here every item has its own trigger; candidates for
item i are scored with the exact batch loss where only item i's trigger
changes. The current trigger is always a candidate, so no item's loss rises,
and `update_triggers` only keeps a joint update that does not raise the batch
loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (item indices (M,), triggers (M, k)) -> exact batch loss (M,) when only that
# item's trigger is replaced.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hotflip_candidates(grads: torch.Tensor, embedding_matrix: torch.Tensor,
                       allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token ids minimising the first-order loss change, per item and position.

    grads: (B, k, E) loss gradient w.r.t. each trigger token's input embedding.
    embedding_matrix: (V, E). allowed: (A,) ids the trigger may use.
    Returns (B, k, top_k) ids. The e_i . grad_i term is the same for every
    candidate at a position, so ranking by e' . grad_i suffices.
    """
    allowed_embeddings = embedding_matrix[allowed].to(grads.dtype)  # (A, E)
    scores = grads @ allowed_embeddings.T  # (B, k, A)
    best = scores.topk(min(top_k, allowed.numel()), dim=-1, largest=False).indices
    return allowed.to(best.device)[best]


def beam_search(current: torch.Tensor, candidates: torch.Tensor, score: ScoreFn,
                beam_width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, search positions left to right over candidates (plus the current token).

    current: (B, k) triggers; candidates: (B, k, K). Returns the best triggers
    (B, k) and their scores (B,) from `score` (others' triggers held fixed).
    """
    batch, length = current.shape
    items = torch.arange(batch)
    beams = current[:, None, :].clone()  # (B, W, k)
    beam_scores = score(items, current)[:, None]  # (B, 1)
    for position in range(length):
        options = torch.cat([current[:, position:position + 1], candidates[:, position]], dim=1)
        width, n_options = beams.shape[1], options.shape[1]
        expanded = beams[:, :, None, :].expand(batch, width, n_options, length).clone()
        expanded[:, :, :, position] = options[:, None, :].expand(batch, width, n_options)
        flat = expanded.reshape(batch * width * n_options, length)
        owners = items.repeat_interleave(width * n_options)
        scores = score(owners, flat).reshape(batch, width * n_options)
        # Keep the existing beams in the running: equal triggers score equally,
        # so the incumbent is never dropped for a worse candidate.
        keep = min(beam_width, scores.shape[1])
        top = scores.topk(keep, dim=1, largest=False)
        beams = expanded.reshape(batch, width * n_options, length)[items[:, None], top.indices]
        beam_scores = top.values
    return beams[:, 0], beam_scores[:, 0]


def update_triggers(current: torch.Tensor, candidates: torch.Tensor, score: ScoreFn,
                    joint_loss: Callable[[torch.Tensor], torch.Tensor],
                    beam_width: int = 1) -> tuple[torch.Tensor, float, float]:
    """One HotFlip round for a batch. Returns (new triggers, loss before, loss after).

    Items are searched independently; if applying every item's best trigger at
    once raised the batch loss (the items interact through the contrastive
    denominator), only the single most improving item's change is kept, which
    cannot raise it.
    """
    before = float(joint_loss(current))
    best, best_scores = beam_search(current, candidates, score, beam_width)
    after = float(joint_loss(best))
    if after <= before:
        return best, before, after
    gains = before - best_scores
    winner = int(torch.argmax(gains))
    single = current.clone()
    if gains[winner] > 0:
        single[winner] = best[winner]
    return single, before, float(joint_loss(single))
