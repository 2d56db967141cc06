"""Shift-pattern: one pattern per group, chosen to move its images' features one way.

Why (issue 12, the black box): class-pattern's random signs, one pattern per answer,
are a shortcut the attacker on the ResNet-50 tower memorises (-48% exact match), but
EfficientNet-Lite0 (-12%) and DINOv2 (-2%) pass little of them on to the attacker's
trained layers: random signs barely move their features. Here each group's pattern
is optimised to displace the frozen towers' features as far as the budget allows
along one direction of its own, for all the group's images alike: a feature-space
universal perturbation per group (Mopuri et al., Fast Feature Fool, BMVC 2017;
GD-UAP, TPAMI 2018, whose feature-maximising patterns transfer between
architectures). Each group's images then carry a shift that every tower in the
loss sees and a trained projector can read as the answer; clean images lack it.
Unlike wrong-target's collision there is no target point to stop at: the shift is
pushed as far as the budget lets it.

Loss (ascended): for each surrogate tower k (all members of an ensemble) and each
group g of the batch, the mean over g's images of (f_k(x + p_g) - f_k(x)) . u_g,k,
in units of tower k's mean distance between group centroids. Directions u (unit
vectors per group and tower): `random` (seeded; distinct groups get distinct,
unrelated shifts) or `wrong` (from g's centroid to that of another group under a
seeded permutation, as wrong-target's: the shift also reads as a wrong answer).

Groups: triples by their answers; pairs by k-means on the surrogate's clean
features (`groups`). Patterns start from class-pattern's signs (`start signs`)
or zero.

Pattern space: per pixel and channel by default. `gray_noise` (one luma channel)
and `coarse` (a grid 2-4 times coarser, bilinearly upsampled) keep the pattern
where the attacker's transformations leave it: on the 28-px Fashion-MNIST images,
Pillow's JPEG-75 keeps 34% of a random colour sign pattern's energy, 74% of a
luma one and 91-92% of a luma one on a 2- or 4-times coarser grid; resizing by
0.5 and blur (sigma 1) keep 24% / 30% per pixel, 59% / 68% at coarse 2 and
81% / 86% at coarse 4 (benchmarks/pattern_survival.py). A coarse pattern resumes
its own grid each time a batch holds the group (`pgd.grid_of`). For large photos,
`cells` fixes the grid (8 x 8 cells whatever the size): a model reading a 512-px image
at 128 px keeps 4% of a per-pixel pattern and 99% of an 8 x 8 luma one, and images of
different sizes share their group's pattern, each at its own size.

`full_budget` releases each optimised pattern at +-eps by its sign (per grid cell):
the optimiser leaves many values inside the budget (a luma coarse-4 pattern moves
its pixels by 3 of 8 levels on average), and a weak pattern is what an attacker's
transformation masks first.

Config (ShiftPatternConfig): eps (8/255), step_size (1/255), pgd_steps (40),
batch_size (32), rounds (1), groups (32, pairs), direction (random), start (signs),
full_budget (off), coarse (1), cells (0), gray_noise (off), surrogates (lit for pairs,
smolvlm-lite for triples; several for an ensemble).

Example:
    mmguard protect --dataset fashion-mnist --kind triples --method shift-pattern \\
        --surrogate smolvlm-lite --surrogate smolvlm-lite-c --out out/
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError
from mmguard.protect.base import DatasetView, ProtectionItem, group_pattern, option
from mmguard.protect.engine import BilevelMethod, SurrogateConfig
from mmguard.protect.grouping import (
    answer_groups,
    dataset_feature_parts,
    kmeans_groups,
    mean_centroid_distance,
    pattern_name,
)
from mmguard.protect.pgd import at_full_budget
from mmguard.protect.surrogates import TextItem


@dataclass
class ShiftPatternConfig(SurrogateConfig):
    batch_size: int = option(32, "Images per optimisation batch.", min=2)
    pgd_steps: int = option(40, "PGD steps per batch and round.", min=1)
    rounds: int = option(1, "shift-pattern: passes over the data.", min=1)
    groups: int = option(32, "shift-pattern: k-means clusters of the clean features (pairs; "
                         "triples are grouped by their answers).", min=2)
    direction: str = option("random", "shift-pattern: each group's feature direction, a "
                            "seeded random one (random) or toward another group's centroid "
                            "(wrong).", choices=("random", "wrong"))
    start: str = option("signs", "shift-pattern: start each pattern from class-pattern's "
                        "random signs at eps (signs) or from zero.", choices=("signs", "zero"))
    full_budget: bool = option(False, "shift-pattern: release each optimised pattern at the "
                               "full budget, +-eps by the sign of each of its values (each "
                               "grid cell with coarse / gray_noise): more energy, same "
                               "direction.", flag=True)


class ShiftPattern(BilevelMethod):
    name = "shift-pattern"
    summary = ("one pattern per answer or cluster that shifts the frozen towers' features "
               "one way (feature-space UAP per group); no trigger")
    Config = ShiftPatternConfig
    config: ShiftPatternConfig
    default_surrogates = {"pairs": ("lit",)}
    maximize = True

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        return [self.text_item(item, 0) for item in items]

    def before_rounds(self, data: DatasetView) -> None:
        # One pass of the frozen towers over the clean data; deterministic, so a resumed
        # run recomputes it rather than storing it.
        keys, towers, answers = dataset_feature_parts(data, self.surrogate,
                                                      self.config.batch_size, self.device,
                                                      self.batch_statistics)
        labels = (answer_groups(keys, answers) if self.kind == "triples"
                  else kmeans_groups(torch.cat(towers, dim=1), self.config.groups,
                                     self.config.seed))
        if len(set(labels)) < 2:
            raise MMGuardError("shift-pattern needs at least two groups of images (two "
                               "different answers, or --groups 2 or more)")
        self.group_of = dict(zip(keys, labels, strict=True))
        self.features_of = {key: [tower[i] for tower in towers] for i, key in enumerate(keys)}
        self.units = [mean_centroid_distance(tower, labels) for tower in towers]
        self.directions = self._directions(towers, torch.tensor(labels))

    def _directions(self, towers: list[torch.Tensor],
                    labels: torch.Tensor) -> list[torch.Tensor]:
        """Per tower, a (groups, features) matrix of unit directions."""
        count = int(labels.max()) + 1
        generator = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(count, generator=generator).tolist()
        other = {order[i]: order[(i + 1) % count] for i in range(count)}  # no fixed point
        directions = []
        for tower in towers:
            if self.config.direction == "random":
                raw = torch.randn(count, tower.shape[1], generator=generator)
            else:
                centroids = torch.stack([tower[labels == g].mean(dim=0) for g in range(count)])
                raw = torch.stack([centroids[other[g]] - centroids[g] for g in range(count)])
            directions.append(F.normalize(raw, dim=1))
        return directions

    def noise_key(self, item: ProtectionItem) -> str:
        return f"group {self.group_of[item.key]}"  # set by before_rounds

    def initial_noise(self, item: ProtectionItem) -> torch.Tensor:
        if self.config.start == "zero":
            return super().initial_noise(item)
        group = pattern_name(item, self.kind, self.group_of[item.key])
        pattern = group_pattern(item.image, group, self.config.eps, self.config.seed,
                                self.config.coarse, self.config.gray_noise,
                                cells=self.config.cells)
        return (item.image + pattern).clamp(0.0, 1.0) - item.image

    def released_noise(self, item: ProtectionItem, delta: torch.Tensor) -> torch.Tensor:
        if not self.config.full_budget:
            return delta
        return at_full_budget(delta, self.config.eps, self.config.coarse,
                              self.config.gray_noise, self.config.cells)

    def _shift(self, items: list[ProtectionItem], images: list[torch.Tensor]) -> torch.Tensor:
        """Mean over the items of their displacement along their group's direction, in
        each tower's units, summed over the towers."""
        groups = torch.tensor([self.group_of[item.key] for item in items])
        total = torch.zeros((), device=self.device)
        for k, features in enumerate(self.surrogate.image_feature_parts(images)):
            clean = torch.stack([self.features_of[item.key][k] for item in items]).to(
                features.device)
            along = self.directions[k][groups].to(features.device)
            total = total + ((features - clean) * along).sum(dim=1).mean() / self.units[k]
        return total

    def noise_loss(self, items: list[ProtectionItem], texts: list[TextItem], reference: Any,
                   generator: torch.Generator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        return lambda images: self._shift(items, images)  # ascended (maximize)

    @torch.no_grad()
    def measure(self, items: list[ProtectionItem], images: list[torch.Tensor],
                texts: list[TextItem], reference: Any) -> dict[str, float]:
        with self.surrogate.perturbation_mode(self.batch_statistics):
            shift = float(self._shift(items, images))
        return {"shift_along_direction": shift}

    def report(self) -> dict[str, Any]:
        report = super().report()
        if hasattr(self, "units"):
            report["groups"] = len(set(self.group_of.values()))
        return report
