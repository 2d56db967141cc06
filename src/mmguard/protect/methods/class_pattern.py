"""Class-wise synthetic shortcut: one fixed random pattern per group, no model in the loop.

Why (issue 12, the black box): feature collision (`wrong-target`) moves the
features of the tower it was made on and not those of another family (0.6% of
the way on DINOv2, docs/findings.md §10). A shortcut does not have to fool the
attacker's tower, only to be seen by it: when every image with answer `a`
carries the pattern p_a, an attacker who fine-tunes on the data can fit the
answers from the pattern, and on clean data, which has no pattern, it fails.
Class-wise random noise is the classic strong shortcut for training from
scratch (Huang et al. ICLR 2021, sample-wise vs class-wise noise); shortcuts
that work are linearly separable (Yu et al. KDD 2022), and a pattern shared by
a group is separable by construction. Whether a frozen pretrained tower
passes it on to the attacker's trained heads is the open question this method
measures.

Groups: triples by their answer (the pattern is a function of the answer, so
it needs no pass over the data); pairs by k-means on a frozen tower's features
(`cluster_features`, like cluster-em). The pattern is drawn once per group
from the run's seed, as signs (each cell ±eps, the largest change the budget
allows) or uniform values, on a grid `coarse` times coarser than the image and
bilinearly upsampled, so large images keep it through the model's resize; or as an
oriented wave at that grid's scale (`values` grating or square: texture, which a
tower trained to ignore brightness and colour jitter, DINOv2, still reads; see
benchmarks/pattern_visibility.py). A wave's orientation is drawn per group
(`layout` random) or set so that the groups' waves differ as much as they can
(`layout` spread: orientations evenly spread, two frequencies; see `spread_waves`).
Images of one group and one size carry the same pattern; other sizes get the
same group's pattern drawn for their grid.

Config (ClassPatternConfig): eps (8/255), seed (0), coarse (1), gray_noise
(off), values (sign), layout (random), clusters (32), cluster_features (lit).

Example:
    mmguard protect --dataset fashion-mnist --kind triples --method class-pattern --out out/
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmguard.data.budget import project_to_ball
from mmguard.errors import MMGuardError
from mmguard.protect.base import (
    WAVE_VALUES,
    DatasetView,
    MethodConfig,
    ProtectedItem,
    ProtectionItem,
    ProtectionMethod,
    Wave,
    cells_option,
    coarse_option,
    gray_noise_option,
    group_pattern,
    noise_values_option,
    option,
    spread_waves,
)
from mmguard.protect.grouping import answer_of, dataset_answers, dataset_features, kmeans_groups
from mmguard.protect.surrogates import create_surrogate

LAYOUTS = ("random", "spread")


@dataclass
class ClassPatternConfig(MethodConfig):
    coarse: int = coarse_option()
    cells: int = cells_option()
    gray_noise: bool = gray_noise_option()
    values: str = noise_values_option("sign")
    layout: str = option("random", "class-pattern, with values grating or square: each "
                         "group's wave of a random orientation (random), or the groups' "
                         "orientations evenly spread over the half turn, alternately at 1 "
                         "and 1.5 times the frequency (spread), so no two groups carry "
                         "nearly the same wave (measured: no better than random).",
                         choices=LAYOUTS)
    clusters: int = option(32, "class-pattern: k-means clusters sharing one pattern (pairs; "
                           "triples are grouped by their answers).", min=2)
    cluster_features: str = option("lit", "class-pattern: the pretrained contrastive model "
                                   "whose image tower's features are clustered (pairs).")


class ClassPattern(ProtectionMethod):
    name = "class-pattern"
    summary = "one fixed random pattern per answer or k-means cluster (shortcut, model-free)"
    Config = ClassPatternConfig
    config: ClassPatternConfig

    def __init__(self, config: ClassPatternConfig | None = None, kind: str | None = None):
        super().__init__(config, kind)
        if self.config.layout == "spread" and self.config.values not in WAVE_VALUES:
            raise MMGuardError("class-pattern: layout spread sets the waves' orientations; "
                               "give values grating or square")
        self.wave_of: dict[str, Wave] = {}

    def prepare(self, data: DatasetView, workdir: Path) -> None:
        self.cluster_of: dict[str, int] = {}
        if self.kind == "triples":
            # grouped by answer, item by item; a spread layout needs the set of answers
            if self.config.layout == "spread":
                self._spread(f"answer {answer}" for answer in
                             set(dataset_answers(data, batch_size=32).values()))
            return
        # k-means of a frozen tower is deterministic, so a resumed run recomputes it.
        tower = create_surrogate((self.config.cluster_features,), seed=self.config.seed)
        keys, features, _ = dataset_features(data, tower, batch_size=32)
        labels = kmeans_groups(features, self.config.clusters, self.config.seed)
        self.cluster_of = dict(zip(keys, labels, strict=True))
        if self.config.layout == "spread":
            self._spread(f"cluster {label}" for label in set(labels))

    def _spread(self, groups: Iterable[str]) -> None:
        """Deal the groups (in sorted order) spread waves."""
        names = sorted(groups)
        self.wave_of = dict(zip(names, spread_waves(len(names), self.config.seed), strict=True))

    def group_of(self, item: ProtectionItem) -> str:
        if self.kind == "triples" or item.responses:
            return f"answer {answer_of(item)}"
        if item.key not in getattr(self, "cluster_of", {}):
            raise RuntimeError("class-pattern protects pairs after prepare() has clustered them")
        return f"cluster {self.cluster_of[item.key]}"

    def pattern(self, group: str, image: torch.Tensor) -> torch.Tensor:
        """The group's pattern for an image of this size, in [-eps, eps]."""
        wave = None
        if self.config.layout == "spread":
            if group not in self.wave_of:
                raise RuntimeError(f"class-pattern: {group!r} was not among the groups "
                                   "prepare() spread the waves over")
            wave = self.wave_of[group]
        return group_pattern(image, group, self.config.eps, self.config.seed,
                             self.config.coarse, self.config.gray_noise, self.config.values,
                             self.config.cells, wave)

    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        return [ProtectedItem(project_to_ball(item.image + self.pattern(self.group_of(item),
                                                                        item.image),
                                              item.image, self.config.eps))
                for item in batch]
