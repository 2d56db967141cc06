"""Projected gradient descent (or ascent) on per-image L-infinity perturbations.

Works on lists of images of different sizes. Gradients are taken with
`torch.autograd.grad` w.r.t. the perturbations only, so nothing accumulates in
the model's parameters between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmguard.data.budget import project_to_ball


def project_delta(original: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """`delta` moved into the eps-ball around `original`, keeping original + delta in [0, 1]."""
    return project_to_ball(original + delta, original, eps) - original


def pgd(originals: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
        loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], *, eps: float,
        step_size: float, steps: int, maximize: bool = False,
        shared_by: Sequence[int] | None = None) -> list[torch.Tensor]:
    """`steps` signed-gradient steps on each delta; returns the new (detached) deltas.

    Arguments:
        originals: clean images, each (3, H, W) in [0, 1].
        deltas: current perturbations, same shapes (zeros for a fresh start).
        loss_fn: perturbed images -> scalar loss.
        eps: L-infinity budget; step_size: per-step change (e.g. 1/255).
        maximize: ascend (error-maximising, UAP) instead of descend (EM, MEM).
        shared_by: shared noise. Image i then uses deltas[shared_by[i]] (images sharing
            one must have its shape); its gradient sums over them. As no single
            [0, 1] projection fits every sharer, the perturbed images are clamped to
            [0, 1] in the forward pass instead, and the caller clamps the output.
    """
    sign = 1.0 if maximize else -1.0
    if shared_by is None:
        current = [project_delta(x, d.detach(), eps)
                   for x, d in zip(originals, deltas, strict=True)]
    else:
        current = [d.detach().clamp(-eps, eps) for d in deltas]
    for _ in range(steps):
        variables = [d.clone().requires_grad_(True) for d in current]
        if shared_by is None:
            images = [x + d for x, d in zip(originals, variables, strict=True)]
        else:
            images = [(x + variables[j]).clamp(0.0, 1.0)
                      for x, j in zip(originals, shared_by, strict=True)]
        grads = torch.autograd.grad(loss_fn(images), variables)
        if shared_by is None:
            current = [project_delta(x, d.detach() + sign * step_size * g.sign(), eps)
                       for x, d, g in zip(originals, current, grads, strict=True)]
        else:
            current = [(d + sign * step_size * g.sign()).clamp(-eps, eps)
                       for d, g in zip(current, grads, strict=True)]
    return current


def random_start(originals: Sequence[torch.Tensor], eps: float,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    return [project_delta(x, (torch.rand(x.shape, generator=generator) * 2 - 1) * eps, eps)
            for x in originals]
