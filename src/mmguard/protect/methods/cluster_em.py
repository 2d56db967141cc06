"""Cluster-wise error-minimising noise: one shared code per cluster, then per image.

Class-wise noise is the strongest shortcut in the error-minimising literature
(Huang et al. 2021; contrastive poisoning, He et al. ICLR 2023), and shortcuts
that work are linearly separable (Yu et al. KDD 2022). Image-text data has no
classes, so, as Unlearnable Clusters (Zhang et al. CVPR 2023) does, the images
are clustered by k-means on a pretrained tower's features (`cluster_features`,
default the LiT's EfficientNet-Lite0; triples are grouped by their answers),
and every image of a cluster shares one noise pattern, optimised by the
error-minimising loop of `em` (`protect/engine.py`) for `rounds` rounds; then
`refine_rounds` more rounds give each image its own copy to refine.

Shared noise needs the images of a cluster to be of one size (emoji, digits,
Fashion-MNIST are); other data should use `em`.

Config (ClusterEMConfig): EM's options plus clusters (32), cluster_features
("lit"), refine_rounds (0).

Example:
    mmguard protect --dataset emoji --method cluster-em --clusters 32 --out out/
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmguard.protect.base import DatasetView, ProtectionItem, option
from mmguard.protect.grouping import (
    answer_groups,
    dataset_answers,
    dataset_features,
    kmeans_groups,
)
from mmguard.protect.methods.em import EMConfig, ErrorMinimizing
from mmguard.protect.surrogates import create_surrogate


@dataclass
class ClusterEMConfig(EMConfig):
    clusters: int = option(32, "cluster-em: k-means clusters sharing one noise pattern "
                           "(pairs; triples are grouped by their answers).", min=2)
    cluster_features: str = option("lit", "cluster-em: the pretrained contrastive model whose "
                                   "image tower's features are clustered.")
    refine_rounds: int = option(0, "cluster-em: rounds after the shared ones in which each "
                                "image refines its own copy of its cluster's noise.", min=0)


class ClusterErrorMinimizing(ErrorMinimizing):
    name = "cluster-em"
    summary = "error-minimising noise shared per k-means cluster of pretrained features"
    Config = ClusterEMConfig
    config: ClusterEMConfig

    @property
    def rounds(self) -> int:
        return self.config.rounds + self.config.refine_rounds

    def before_rounds(self, data: DatasetView) -> None:
        saved = self.store.read_json("clusters.json", None)
        if saved is None:
            saved = self._cluster(data)
            self.store.write_json("clusters.json", saved)
        self.cluster_of: dict[str, int] = saved
        self._round_index = 0

    def _cluster(self, data: DatasetView) -> dict[str, int]:
        if self.kind == "triples":
            answers = dataset_answers(data, self.config.batch_size)
            keys = list(answers)
            return dict(zip(keys, answer_groups(keys, answers), strict=True))
        tower = create_surrogate((self.config.cluster_features,), device=self.config.device,
                                 seed=self.config.seed)
        keys, features, _ = dataset_features(data, tower, self.config.batch_size,
                                             self.config.device)
        labels = kmeans_groups(features, self.config.clusters, self.config.seed)
        return dict(zip(keys, labels, strict=True))

    def _round(self, data: DatasetView, round_index: int):
        self._round_index = round_index
        return super()._round(data, round_index)

    def noise_key(self, item: ProtectionItem) -> str:
        if self._refining(item):
            return item.key
        return f"cluster {self.cluster_of[item.key]}"

    def _refining(self, item: ProtectionItem) -> bool:
        return getattr(self, "_round_index", 0) >= self.config.rounds \
            or self.store.has_delta(item.key)

    def initial_noise(self, item: ProtectionItem) -> torch.Tensor:
        """A refining image starts from its cluster's pattern."""
        if self._refining(item):
            cluster = f"cluster {self.cluster_of[item.key]}"
            if self.store.has_delta(cluster):
                shared = self.store.delta(cluster, item.image.shape)
                return (item.image + shared).clamp(0.0, 1.0) - item.image
        return super().initial_noise(item)
