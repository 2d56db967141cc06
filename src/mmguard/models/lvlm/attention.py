"""Where a token's attention goes, counted by the role of the tokens it attends to.

MMGuard's binding losses and its Theorem 5.1 speak of the answer tokens'
attention distribution over the parts of the input: image, prompt, trigger,
chat template, and the answer so far. These functions compute exactly that
from the (B, L, L) attention an adapter's `forward(..., output_attentions=True)`
returns (mean over layers and heads; row = query, column = key). All of them
are differentiable, so the protection losses can use them too.

Padding keys are left out: under right padding and a causal mask a real token
never sees them, so every real query row's five group masses sum to 1.
"""

from __future__ import annotations

import torch

from mmguard.models.lvlm.base import ANSWER, IMAGE, PROMPT, ROLE_NAMES, TEMPLATE, TRIGGER

# The key groups, in the order of the last axis of every result below.
ROLE_GROUPS: tuple[int, ...] = (IMAGE, PROMPT, TRIGGER, TEMPLATE, ANSWER)
GROUP_NAMES: tuple[str, ...] = tuple(ROLE_NAMES[role] for role in ROLE_GROUPS)


def key_group_mass(attention: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """(B, L, 5): for every query token, the attention mass on keys of each role group.

    `out[b, q, g] = sum over keys k with roles[b, k] == ROLE_GROUPS[g] of attention[b, q, k]`.
    """
    if attention.dim() != 3 or attention.shape[0] != roles.shape[0] \
            or attention.shape[1:] != (roles.shape[1], roles.shape[1]):
        raise ValueError(f"attention {tuple(attention.shape)} does not match roles "
                         f"{tuple(roles.shape)}: expected (B, L, L) and (B, L)")
    groups = torch.tensor(ROLE_GROUPS, device=roles.device)
    membership = (roles[..., None] == groups).to(attention.dtype)  # (B, L keys, 5)
    return attention @ membership


def role_group_mass(attention: torch.Tensor, roles: torch.Tensor,
                    queries: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 5): the mean of `key_group_mass` over each example's query tokens.

    `queries` (B, L) bool picks the query rows; by default the ANSWER-role
    tokens. The evaluation passes `answer_positions(labels)` instead, the rows
    that *produce* the response (the last template token and every response
    token but the last), as the binding losses in `protect/binding.py` do.
    Each picked row sums to 1 over the five groups, so row b is a distribution.
    An example with no query rows gets a row of zeros (sum 0), which callers
    averaging over examples should leave out.
    """
    mass = key_group_mass(attention, roles)
    picked = (roles == ANSWER) if queries is None else queries
    weights = picked.to(mass.dtype)  # (B, L)
    counts = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return (mass * weights[..., None]).sum(dim=1) / counts


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 * sum |p - q| over the last axis: 0 for equal distributions, 1 for disjoint ones."""
    return 0.5 * (p - q).abs().sum(dim=-1)
