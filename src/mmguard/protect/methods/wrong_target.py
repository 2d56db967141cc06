"""Wrong-target poisoning: move each image's features to those of another group.

After targeted adversarial poisoning (TAP, Fowl et al., NeurIPS 2021) and
BAIT (arXiv 2603.04731), for image-text data and frozen pretrained towers.
The images are grouped (triples: by their answer; pairs: k-means on the
surrogate's clean image features), a seeded permutation π with no fixed point
maps every group to another one, and each image's noise is optimised so that
the surrogate's frozen image tower sees it as a member of π(its group): the
loss is the cross-entropy of a nearest-centroid classifier over all group
centroids, with π(group) as the label, so the image is pulled to the wrong
centroid *and* pushed away from every other, its own included.

The texts are released untouched (no trigger to strip). An attacker who
trains heads, a projector or LoRA on the frozen tower's features then learns
"features of group π(g) -> texts of group g", and on clean test images, whose
features sit with their own group, answers with the texts of π⁻¹(group).

Config (WrongTargetConfig): eps (8/255), step_size (1/255), pgd_steps (40),
batch_size (32), groups (32: k-means clusters for pairs; triples use their
answers), temperature (0.1, in units of the mean centroid distance),
surrogates (lit for pairs, smolvlm-lite for triples).

Example:
    mmguard protect --dataset emoji --method wrong-target --surrogate lit --out out/
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError
from mmguard.protect.base import DatasetView, ProtectionItem, option
from mmguard.protect.engine import BilevelMethod, SurrogateConfig
from mmguard.protect.grouping import answer_groups, dataset_features, kmeans_groups
from mmguard.protect.surrogates import TextItem


@dataclass
class WrongTargetConfig(SurrogateConfig):
    batch_size: int = option(32, "Images per optimisation batch.", min=2)
    pgd_steps: int = option(40, "PGD steps per batch and round.", min=1)
    groups: int = option(32, "wrong-target: k-means clusters of the clean image features "
                         "(pairs; triples are grouped by their answers).", min=2)
    temperature: float = option(0.1, "wrong-target: softmax temperature of the nearest-"
                                "centroid loss, in units of the mean distance between "
                                "centroids.", min=0.0)


class WrongTarget(BilevelMethod):
    name = "wrong-target"
    summary = "features moved to another group's centroid on a frozen pretrained tower (TAP)"
    Config = WrongTargetConfig
    config: WrongTargetConfig
    default_surrogates = {"pairs": ("lit",)}

    @property
    def rounds(self) -> int:
        return 1

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        return [self.text_item(item, 0) for item in items]

    # -- groups, centroids and the permutation -------------------------------------------
    def before_rounds(self, data: DatasetView) -> None:
        saved = self.store.read_json("targets.json", None)
        if saved is not None:
            self.group_of, self.target_of = saved["group_of"], saved["target_of"]
            self.centroids = torch.tensor(saved["centroids"])
            self.scale = saved["scale"]
            return
        keys, matrix, answers = dataset_features(data, self.surrogate, self.config.batch_size,
                                                 self.device, self.batch_statistics)
        labels = torch.tensor(answer_groups(keys, answers) if self.kind == "triples"
                              else kmeans_groups(matrix, self.config.groups, self.config.seed))
        count = int(labels.max()) + 1
        if count < 2:
            raise MMGuardError("wrong-target needs at least two groups of images (two "
                               "different answers, or --groups 2 or more)")
        self.centroids = torch.stack([matrix[labels == g].mean(dim=0) for g in range(count)])
        # Distances are measured in units of the mean distance between centroids, so
        # the temperature means the same for every feature space.
        self.scale = float(torch.cdist(self.centroids, self.centroids).sum()
                           / max(1, count * (count - 1)))
        generator = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(count, generator=generator).tolist()
        shift = {order[i]: order[(i + 1) % count] for i in range(count)}  # no fixed point
        self.group_of = {key: int(label) for key, label in zip(keys, labels, strict=True)}
        self.target_of = {key: shift[group] for key, group in self.group_of.items()}
        self.store.write_json("targets.json", {
            "group_of": self.group_of, "target_of": self.target_of,
            "centroids": self.centroids.tolist(), "scale": self.scale})

    # -- the noise step -------------------------------------------------------------------
    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(features, self.centroids.to(features.device)) / self.scale
        return -distances / self.config.temperature

    def noise_loss(self, items: list[ProtectionItem], texts: list[TextItem], reference: Any,
                   generator: torch.Generator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        targets = torch.tensor([self.target_of[item.key] for item in items], device=self.device)

        def loss(images: list[torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(self._logits(self.surrogate.image_features(images)), targets)

        return loss

    @torch.no_grad()
    def measure(self, items: list[ProtectionItem], images: list[torch.Tensor],
                texts: list[TextItem], reference: Any) -> dict[str, float]:
        with self.surrogate.perturbation_mode(self.batch_statistics):
            logits = self._logits(self.surrogate.image_features(images))
        nearest = logits.argmax(dim=1).cpu()
        targets = torch.tensor([self.target_of[item.key] for item in items])
        own = torch.tensor([self.group_of[item.key] for item in items])
        return {"train_loss": float(F.cross_entropy(logits.cpu(), targets)),
                "share_at_target": float((nearest == targets).float().mean()),
                "share_at_own_group": float((nearest == own).float().mean())}

    def report(self) -> dict[str, Any]:
        report = super().report()
        if hasattr(self, "centroids"):
            report["groups"] = int(self.centroids.shape[0])
        return report
