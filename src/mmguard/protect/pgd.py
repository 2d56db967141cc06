"""Projected gradient descent (or ascent) on per-image L-infinity perturbations.

Works on lists of images of different sizes. Gradients are taken with
`torch.autograd.grad` w.r.t. the perturbations only, so nothing accumulates in
the model's parameters between steps.

With `coarse=k > 1` the variable is a grid k times coarser than the image, and
the perturbation is its bilinear upsampling: low-frequency noise, which JPEG
keeps (its quantisation removes the high DCT frequencies first), which resizing
and blur average away less, and which transfers better between models (Guo et
al., "Low Frequency Adversarial Perturbation", UAI 2019). Bilinear weights are
convex, so the upsampled noise stays inside the same L-infinity ball. (On
Fashion-MNIST VQA neither helped wrong-target survive JPEG or transfer:
docs/findings-lvlm.md.)

With `cells=n > 0` the grid is n x n cells whatever the image's size, stretched
to each image: the pattern keeps its size relative to the picture, which is what
a model sees after resizing it to its input (a photo of 2000 px at `coarse=4`
has cells of 4 px, which a 128-px model averages away), and images of different
sizes can share one grid (a group's pattern, upsampled to each member's size).

With `gray=True` one noise channel is added to R, G and B alike: luma-only noise,
which grayscale conversion keeps whole and JPEG codes with its fine luma tables
rather than its coarse, subsampled chroma ones.

With `schedule="cosine"` the step size falls from `step_size` to a twentieth of
it along a half cosine (as in APGD, Croce & Hein 2020): a fixed signed step
keeps every pixel oscillating by a whole step around its optimum, while a
decaying one settles it there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmguard.data.budget import project_to_ball


def project_delta(original: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """`delta` moved into the eps-ball around `original`, keeping original + delta in [0, 1]."""
    return project_to_ball(original + delta, original, eps) - original


def grid_size(image: torch.Tensor, coarse: int, cells: int = 0) -> tuple[int, int]:
    """(h, w) of the noise grid: `cells` x `cells` if `cells`, else `coarse` times
    coarser than the image (rounded up)."""
    if cells:
        if coarse > 1:
            raise ValueError("a noise grid is either coarse or of fixed cells, not both")
        return cells, cells
    return (max(1, math.ceil(image.shape[-2] / coarse)),
            max(1, math.ceil(image.shape[-1] / coarse)))


def is_grid(coarse: int, cells: int, gray: bool) -> bool:
    """Whether noise of these settings lives on a grid (else per pixel and channel)."""
    return coarse > 1 or cells > 0 or gray


def fit_noise(noise: torch.Tensor, shape: Sequence[int], cells: int) -> torch.Tensor:
    """Grid noise of another image (fixed `cells`) stretched to an image of `shape`:
    its grid, upsampled to that size (exact for noise that is an upsampled grid)."""
    if tuple(noise.shape) == tuple(shape):
        return noise
    if not cells:
        raise ValueError("only noise on a fixed grid of cells fits images of other sizes")
    grid = grid_of(noise, (cells, cells))
    return upsample_noise(grid, tuple(shape[-2:])).expand(tuple(shape)).contiguous()


def upsample_noise(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (3, h, w) noise grid, bilinearly upsampled to (3, *size)."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    return F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]


# Above this many entries (cells x side) an exact grid costs more than it is worth
# (a 4000-px side at coarse 2 would multiply by a 2000 x 4000 matrix at every visit):
# such noise falls back to the area average, which smooths it slightly per visit.
EXACT_GRID_ENTRIES = 1 << 20


@functools.lru_cache(maxsize=64)
def _upsampling_inverse(cells: int, size: int) -> torch.Tensor:
    """(cells, size): the pseudo-inverse of 1-D linear upsampling from `cells` to `size`
    values, as `upsample_noise` does it along one side."""
    eye = torch.eye(cells)[None]  # row i: the unit vector of cell i
    upsampling = F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T
    return torch.linalg.pinv(upsampling)


def grid_of(noise: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """The (C, *cells) grid whose `upsample_noise` is nearest `noise` (least squares).

    Bilinear upsampling is separable, noise = A_h grid A_w^T, so the grid is
    pinv(A_h) noise pinv(A_w)^T: exact for noise that is an upsampled grid. A method
    whose noise comes back to the optimiser several times (shared patterns, rounds)
    then resumes the grid it left, where an area average would smooth it a little more
    at every visit (the fallback for very large grids, see EXACT_GRID_ENTRIES)."""
    height, width = noise.shape[-2:]
    if (height, width) == tuple(cells):
        return noise
    if max(cells[0] * height, cells[1] * width) > EXACT_GRID_ENTRIES:
        return F.adaptive_avg_pool2d(noise[None], cells)[0]
    rows = _upsampling_inverse(cells[0], height).to(noise)
    cols = _upsampling_inverse(cells[1], width).to(noise)
    return rows @ noise @ cols.T


def at_full_budget(noise: torch.Tensor, eps: float, coarse: int = 1,
                   gray: bool = False, cells: int = 0) -> torch.Tensor:
    """`noise` with each free value pushed to +-eps by its sign: per pixel and channel,
    or, for noise of a coarse grid (`coarse`, `gray`, as `pgd` makes it), per grid cell,
    upsampled again. The largest perturbation the budget allows in the noise's own
    space and direction; a cell at exactly zero stays zero."""
    if not is_grid(coarse, cells, gray):
        return noise.sign() * eps
    start = noise.mean(dim=0, keepdim=True) if gray else noise
    grid = grid_of(start, grid_size(noise, coarse, cells)).sign() * eps
    return upsample_noise(grid, tuple(noise.shape[-2:])).expand(noise.shape).contiguous()


SCHEDULES = ("constant", "cosine")


def step_sizes(step_size: float, steps: int, schedule: str = "constant") -> list[float]:
    """The size of each of `steps` signed steps under `schedule` (see the module note)."""
    if schedule == "constant":
        return [step_size] * steps
    if schedule != "cosine":
        raise ValueError(f"unknown step schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    final = step_size / 20
    return [final + (step_size - final) * 0.5 * (1 + math.cos(math.pi * i / max(1, steps - 1)))
            for i in range(steps)]


def pgd(originals: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
        loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], *, eps: float,
        step_size: float, steps: int, maximize: bool = False,
        shared_by: Sequence[int] | None = None, coarse: int = 1,
        gray: bool = False, schedule: str = "constant", cells: int = 0,
        centers: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """`steps` signed-gradient steps on each delta; returns the new (detached) deltas.

    Arguments:
        originals: clean images, each (3, H, W) in [0, 1].
        deltas: current perturbations, same shapes (zeros for a fresh start).
        loss_fn: perturbed images -> scalar loss.
        eps: L-infinity budget; step_size: per-step change (e.g. 1/255), the first
            step's under a decaying `schedule` (constant or cosine).
        maximize: ascend (error-maximising, UAP) instead of descend (EM, MEM).
        shared_by: shared noise. Image i then uses deltas[shared_by[i]] (images sharing
            one must have its shape); its gradient sums over them. As no single
            [0, 1] projection fits every sharer, the perturbed images are clamped to
            [0, 1] in the forward pass instead, and the caller clamps the output.
        coarse: optimise a grid this many times coarser than each delta and upsample
            it (low-frequency noise, see the module note). A given delta starts the
            grid as its least-squares grid (`grid_of`: exact for a delta this function
            returned); the returned deltas are full size.
        cells: optimise a grid of this many cells per side whatever each delta's size
            (instead of `coarse`); a shared grid is then stretched to each sharer's
            size, so images of different sizes can share it (the returned noise has
            the given delta's size).
        gray: one noise channel for R, G and B (luma only); a given delta starts it as
            its channel mean.
        centers: a fixed offset per delta (same indexing as `deltas`, each of its
            delta's shape): each delta then stays within eps of its center instead of
            zero (a center with |center| <= budget - eps keeps the result within the
            budget). With grid noise the grid is the offset from the center, so a luma
            or coarse move can sit around a center of any form.
    """
    if is_grid(coarse, cells, gray):
        return _grid_pgd(originals, deltas, loss_fn, eps=eps,
                         sizes=step_sizes(step_size, steps, schedule), maximize=maximize,
                         shared_by=shared_by, coarse=coarse, gray=gray, cells=cells,
                         centers=centers)
    sign = 1.0 if maximize else -1.0
    zero = [None] * len(deltas)
    if shared_by is None:
        current = [_project_around(x, d.detach(), c, eps)
                   for x, d, c in zip(originals, deltas, centers or zero, strict=True)]
    else:
        current = [_clamp_around(d.detach(), c, eps)
                   for d, c in zip(deltas, centers or zero, strict=True)]
    for size in step_sizes(step_size, steps, schedule):
        variables = [d.clone().requires_grad_(True) for d in current]
        if shared_by is None:
            images = [x + d for x, d in zip(originals, variables, strict=True)]
        else:
            images = [(x + variables[j]).clamp(0.0, 1.0)
                      for x, j in zip(originals, shared_by, strict=True)]
        grads = torch.autograd.grad(loss_fn(images), variables)
        if shared_by is None:
            current = [_project_around(x, d.detach() + sign * size * g.sign(), c, eps)
                       for x, d, g, c in zip(originals, current, grads, centers or zero,
                                             strict=True)]
        else:
            current = [_clamp_around(d + sign * size * g.sign(), c, eps)
                       for d, g, c in zip(current, grads, centers or zero, strict=True)]
    return current


def _project_around(original: torch.Tensor, delta: torch.Tensor,
                    center: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`delta` within eps of `center` (zero if None), with original + delta in [0, 1]."""
    if center is None:
        return project_delta(original, delta, eps)
    return project_to_ball(original + delta, original + center, eps) - original


def _clamp_around(delta: torch.Tensor, center: torch.Tensor | None, eps: float) -> torch.Tensor:
    if center is None:
        return delta.clamp(-eps, eps)
    return torch.minimum(torch.maximum(delta, center - eps), center + eps)


def _grid_pgd(originals: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
              loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], *, eps: float,
              sizes: list[float], maximize: bool,
              shared_by: Sequence[int] | None, coarse: int, gray: bool,
              cells: int = 0,
              centers: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    sign = 1.0 if maximize else -1.0
    owner = list(range(len(originals))) if shared_by is None else list(shared_by)
    shapes = [tuple(d.shape) for d in deltas]
    bases = list(centers) if centers is not None else [torch.zeros(())] * len(deltas)
    # The grid is the move from each center: a delta given starts it as its offset.
    offsets = [d.detach() - b for d, b in zip(deltas, bases, strict=True)]
    starts = [d.mean(dim=0, keepdim=True) if gray else d for d in offsets]
    grids = [grid_of(d, grid_size(d, coarse, cells)).clamp(-eps, eps) for d in starts]

    def full_size(grid: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return upsample_noise(grid, shape[-2:]).expand(shape)

    for size in sizes:
        variables = [g.clone().requires_grad_(True) for g in grids]
        noise: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        images = []
        for x, j in zip(originals, owner, strict=True):
            # Each image gets its grid at its own size (a fixed-cells grid may be
            # shared by images of several sizes). [0, 1] is kept by clamping in the
            # forward pass, as for shared noise: a grid cannot be projected per pixel.
            if (j, tuple(x.shape)) not in noise:
                if centers is not None and tuple(x.shape) != shapes[j]:
                    raise ValueError("pgd: a center fits only images of its delta's shape")
                noise[j, tuple(x.shape)] = bases[j] + full_size(variables[j], tuple(x.shape))
            images.append((x + noise[j, tuple(x.shape)]).clamp(0.0, 1.0))
        grads = torch.autograd.grad(loss_fn(images), variables)
        grids = [(g + sign * size * d.sign()).clamp(-eps, eps)
                 for g, d in zip(grids, grads, strict=True)]
    full = [(b + full_size(g, shape)).contiguous()
            for g, b, shape in zip(grids, bases, shapes, strict=True)]
    if shared_by is not None:
        return full
    return [_project_around(x, d, b, eps) for x, d, b in zip(originals, full, bases, strict=True)]


def random_start(originals: Sequence[torch.Tensor], eps: float,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    return [project_delta(x, (torch.rand(x.shape, generator=generator) * 2 - 1) * eps, eps)
            for x in originals]
