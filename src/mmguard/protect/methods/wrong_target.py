"""Wrong-target poisoning: move each image's features to those of another group.

After targeted adversarial poisoning (TAP, Fowl et al., NeurIPS 2021) and
BAIT (arXiv 2603.04731), for image-text data and frozen pretrained towers.
The images are grouped (triples: by their answer; pairs: k-means on the
surrogate's clean image features), a seeded permutation π with no fixed point
maps every group to another one, and each image's noise is optimised so that
the surrogate's frozen image tower sees it as a member of π(its group): the
loss is the cross-entropy of a nearest-centroid classifier over all group
centroids, with π(group) as the label, so the image is pulled to the wrong
centroid *and* pushed away from every other, its own included
(`--target centroid`). That loss only sees the few directions that separate
the centroids: the image keeps its own features in every other direction,
and a linear head on the frozen tower reads them (on emoji the nearest
centroid flipped for 99% of the images and the LiT attacker was not hurt at
all). `--target image` (feature collision, the default) instead pulls the
*whole* feature vector onto one image of group π(group), each such image
used about equally often: the attacker then sees another image's features
under this image's text.

The texts are released untouched (no trigger to strip). An attacker who
trains heads, a projector or LoRA on the frozen tower's features then learns
"features of group π(g) -> texts of group g", and on clean test images, whose
features sit with their own group, answers with the texts of π⁻¹(group).

Config (WrongTargetConfig): eps (8/255), step_size (1/255), pgd_steps (40), batch_size
(32), groups (32: k-means clusters for pairs; triples use their answers), target
(image), pairing (random; nearest: each group to a near group, each image to a near
image of it), temperature (0.1, in units of the mean centroid distance; centroid target
only), rounds (1), retrain_steps (0: N trains the crafting tower N steps on the current
release before each later round, as the attacker trains on it), retrain_epochs (0: the
same in passes over the data), clean_epochs (0: the surrogate's tower as it is; N: first
trained N epochs on the clean data, e.g. `--surrogate rn-tiny --clean-epochs 30
--surrogate-lr 5e-4` for attackers who train from scratch, as TAP crafts on a model
trained on the data), pretrained_too (off: with clean_epochs, also collide on the
pretrained tower as it came, an ensemble for attackers who fine-tune it and who do not),
noise_groups (item; group: one noise per answer or cluster, a universal perturbation per
group), pattern_share (0; s > 0: a fixed random sign pattern per group at s * eps, as
class-pattern draws it, with the collision within (1 - s) * eps around it; pattern_cells,
pattern_gray_noise and pattern_values draw it as class-pattern's cells, gray_noise and
values do), surrogate_bn
(running: BatchNorm on the tower's running statistics, as a frozen tower reads images;
batch: on each batch's own, as a tower being fine-tuned reads them while it trains),
surrogates (lit for pairs, smolvlm-lite for triples).

Example:
    mmguard protect --dataset emoji --method wrong-target --surrogate lit --out out/
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError
from mmguard.protect.base import (
    DatasetView,
    ProtectionItem,
    group_pattern,
    noise_values_option,
    option,
)
from mmguard.protect.engine import BilevelMethod, SurrogateConfig, clean_epochs_option
from mmguard.protect.grouping import (
    answer_groups,
    balanced_nearest,
    dataset_features,
    kmeans_groups,
    mean_centroid_distance,
    nearest_derangement,
    pattern_name,
)
from mmguard.protect.surrogates import Surrogate, TextItem, create_surrogate


@dataclass
class WrongTargetConfig(SurrogateConfig):
    batch_size: int = option(32, "Images per optimisation batch.", min=2)
    pgd_steps: int = option(40, "PGD steps per batch and round.", min=1)
    groups: int = option(32, "wrong-target: k-means clusters of the clean image features "
                         "(pairs; triples are grouped by their answers).", min=2)
    target: str = option("image", "wrong-target: pull the whole feature vector onto one "
                         "image of the target group (image), or only flip a nearest-centroid "
                         "classifier to the target group (centroid).",
                         choices=("image", "centroid"))
    # A collision made on DINOv2 or VGG16 moves the features as far toward their targets
    # (about 35% of the way) as on the two CNNs, but puts 22% of the images nearest the
    # target group's centroid where the CNNs' put 55%. Nearer targets were meant to be
    # crossed to more often; on DINOv2 they were crossed to by 30%, and 46% of the images
    # stayed nearest their own group (docs/findings-lvlm.md), so random stays the default.
    pairing: str = option("random", "wrong-target: which group and image each image is "
                          "pulled to: a seeded random permutation of the groups and their "
                          "images used in turn (random), or each group sent to a near group "
                          "and each image to a near image of it, each used about alike "
                          "(nearest; distances on the clean features, each ensemble "
                          "member's in its own units with member_units).",
                          choices=("random", "nearest"))
    temperature: float = option(0.1, "wrong-target: softmax temperature of the nearest-"
                                "centroid loss, in units of the mean distance between "
                                "centroids.", min=0.0)
    # TAP crafts on a model trained on the data itself: a tower trained from scratch
    # on the clean pairs stands in for an attacker who trains from scratch.
    clean_epochs: int = clean_epochs_option(0)
    # An attacker who fine-tunes moves the tower away from the pretrained one; crafting on
    # a copy fine-tuned on the clean data follows it there, and keeping the pretrained tower
    # in the loss keeps the move for the attacker who freezes the tower.
    pretrained_too: bool = option(False, "wrong-target, with clean_epochs: collide on the "
                                  "pretrained tower as well as on the one trained on the clean "
                                  "data (an ensemble of the two; image target only).", flag=True)
    # Towers differ in feature scale (EfficientNet's 16 x 1280 map against DINOv2's
    # 17 x 384 tokens): side by side, one distance is mostly the larger tower's.
    member_units: bool = option(False, "wrong-target, image target with an ensemble of "
                                "surrogates: each member's collision in its own units (its "
                                "mean distance between group centroids), summed; otherwise "
                                "one distance over the members' features side by side.",
                                flag=True)
    # Universal perturbations transfer between architectures far better than per-image
    # ones (Moosavi-Dezfooli et al. 2017), and a pattern shared by a group is also a
    # shortcut an attacker can learn on any tower that sees it (Unlearnable Clusters).
    noise_groups: str = option("item", "wrong-target: one noise per image (item), or one "
                               "shared by every image of a group (group: an answer for "
                               "triples, a k-means cluster for pairs), pulled toward the "
                               "group's target images.", choices=("item", "group"))
    # Collision moves the features of the towers it was made on and few others; a
    # fixed pattern per group is a shortcut any tower that sees it can learn
    # (class-pattern: -48% on the ResNet-50 black box, -12% on EfficientNet). Both in
    # one budget: the collision moves within the rest of the ball, around the pattern.
    pattern_share: float = option(0.0, "wrong-target: share of the budget given to a fixed "
                                  "random sign pattern per group (class-pattern's); the "
                                  "collision moves within the rest of the budget around it "
                                  "(0: none; below 1).", min=0.0, max=0.95)
    # The pattern is drawn as class-pattern draws it, with class-pattern's options: a luma
    # 8 x 8 grid is the ResNet-50 family's shortcut (-73% on Fashion-MNIST), the square wave
    # both CNN families'. The collision moves around it per pixel, or in the form the
    # noise options give it (gray_noise: in luma, which a grayscale attacker keeps whole).
    pattern_cells: int = option(0, "wrong-target, with pattern_share: the pattern on a grid "
                                "of this many x this many cells (class-pattern's cells; 0: "
                                "per pixel).", min=0, max=1024)
    pattern_gray_noise: bool = option(False, "wrong-target, with pattern_share: the pattern "
                                      "in luma only (class-pattern's gray_noise).", flag=True)
    pattern_values: str = noise_values_option("sign", "wrong-target, with pattern_share, the "
                                              "pattern's values (class-pattern's values): ")
    rounds: int = option(1, "wrong-target: passes of PGD over the data, each continuing from "
                         "the noise of the last.", min=1)
    # The attacker trains on the release, not on clean data: between rounds the crafting
    # tower does the same, so the next round collides in the space the attacker moves to.
    retrain_steps: int = option(0, "wrong-target: before each round after the first, train "
                                "the crafting tower this many steps on the current release "
                                "(true texts) and re-read the target features on it.", min=0)
    # Steps are a fixed cost: 100 are 2 passes over 1,479 images but 130 over a folder
    # of 24, where they only over-fit the crafting tower. Passes scale with the data.
    retrain_epochs: float = option(0.0, "wrong-target: as retrain_steps, in passes over the "
                                   "data (rounded up to whole batches); give one or the other.",
                                   min=0.0)


class WrongTarget(BilevelMethod):
    name = "wrong-target"
    summary = ("features collided with an image of another group on a frozen pretrained "
               "tower (TAP); no trigger")
    Config = WrongTargetConfig
    config: WrongTargetConfig
    default_surrogates = {"pairs": ("lit",)}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.config.pretrained_too and not (self.config.clean_epochs
                                               and self.config.target == "image"):
            raise MMGuardError("wrong-target: pretrained_too needs clean_epochs > 0 and the "
                               "image target (without them there is one tower)")
        if self.config.member_units and self.config.target != "image":
            raise MMGuardError("wrong-target: member_units needs the image target")
        if self.config.retrain_steps and self.config.retrain_epochs:
            raise MMGuardError("wrong-target: give retrain_steps or retrain_epochs, not both")
        drawn = (self.config.pattern_cells or self.config.pattern_gray_noise
                 or self.config.pattern_values != "sign")
        if drawn and not self.config.pattern_share:
            raise MMGuardError("wrong-target: pattern_cells, pattern_gray_noise and "
                               "pattern_values draw the pattern of pattern_share; give "
                               "pattern_share > 0")
        if (self.config.retrain_steps or self.config.retrain_epochs) and self.config.rounds < 2:
            raise MMGuardError("wrong-target: retraining happens between rounds; give "
                               "rounds 2 or more")

    @property
    def rounds(self) -> int:
        return self.config.rounds

    @property
    def pretrain_epochs(self) -> int:
        return self.config.clean_epochs

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        return [self.text_item(item, 0) for item in items]

    # -- groups, centroids and the permutation -------------------------------------------
    def before_rounds(self, data: DatasetView) -> None:
        # One pass of the frozen tower over the clean data; cheap next to PGD, and
        # deterministic, so a resumed run recomputes it rather than storing it.
        keys, matrix, answers = dataset_features(data, self.surrogate, self.config.batch_size,
                                                 self.device, self.batch_statistics)
        self.features_of = dict(zip(keys, matrix, strict=True))
        self.parts: list[slice] = self._member_slices(data) if self.config.member_units else []
        saved = self.store.read_json("targets.json", None)
        if saved is None:
            saved = self._choose_targets(keys, matrix, answers)
            self.store.write_json("targets.json", saved)
        self.group_of, self.target_of = saved["group_of"], saved["target_of"]
        self.target_image_of = saved["target_image_of"]
        self.centroids = torch.tensor(saved["centroids"])
        self.scale = saved["scale"]
        labels = [self.group_of[key] for key in keys]
        self.part_scales = [mean_centroid_distance(matrix[:, part], labels)
                            for part in self.parts]
        self.pretrained: Surrogate | None = None
        if self.config.pretrained_too:
            # A fresh surrogate is the tower as it came: deterministic, so not stored.
            self.pretrained = create_surrogate(self.surrogate_names, device=self.config.device,
                                               seed=self.config.seed,
                                               **self.surrogate_options())
            _, pretrained_matrix, _ = dataset_features(data, self.pretrained,
                                                       self.config.batch_size, self.device,
                                                       self.batch_statistics)
            self.pretrained_features_of = dict(zip(keys, pretrained_matrix, strict=True))
            self.pretrained_scale = mean_centroid_distance(
                pretrained_matrix, [self.group_of[key] for key in keys])

    def _member_slices(self, data: DatasetView) -> list[slice]:
        """Where each ensemble member's features lie in the side-by-side vector."""
        first = data.load(data.keys[:1])[0].image.to(self.device)
        with torch.no_grad(), self.surrogate.perturbation_mode(self.batch_statistics):
            widths = [part.shape[1] for part in self.surrogate.image_feature_parts([first])]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        return [slice(start, start + width) for start, width in zip(starts, widths, strict=True)]

    def noise_key(self, item: ProtectionItem) -> str:
        if self.config.noise_groups == "group":
            return f"group {self.group_of[item.key]}"  # set by before_rounds
        return item.key

    def noise_center(self, item: ProtectionItem) -> torch.Tensor | None:
        if not self.config.pattern_share:
            return None
        # Triples are named as class-pattern names them, so the pattern is its release's.
        group = pattern_name(item, self.kind, self.group_of[item.key])
        return group_pattern(item.image, group, self.config.pattern_share * self.config.eps,
                             self.config.seed, gray=self.config.pattern_gray_noise,
                             values=self.config.pattern_values, cells=self.config.pattern_cells)

    @property
    def noise_radius(self) -> float:
        return (1.0 - self.config.pattern_share) * self.config.eps

    def initial_noise(self, item: ProtectionItem) -> torch.Tensor:
        center = self.noise_center(item)
        if center is None:
            return super().initial_noise(item)
        return (item.image + center).clamp(0.0, 1.0) - item.image

    def retraining_steps(self, images: int) -> int:
        """Surrogate steps on the release before each round after the first."""
        if self.config.retrain_epochs:
            return math.ceil(self.config.retrain_epochs * math.ceil(images / self.batch_size))
        return self.config.retrain_steps

    def before_round(self, data: DatasetView, round_index: int) -> None:
        steps = self.retraining_steps(len(data.keys))
        if round_index == 0 or not steps:
            return
        self._train_on_protected(data, round_index, steps)
        # Groups and targets stay; only where the (clean) target images now sit moves.
        keys, matrix, _ = dataset_features(data, self.surrogate, self.config.batch_size,
                                           self.device, self.batch_statistics)
        self.features_of = dict(zip(keys, matrix, strict=True))

    def _choose_targets(self, keys: list[str], matrix: torch.Tensor,
                        answers: dict[str, str]) -> dict[str, Any]:
        labels = torch.tensor(answer_groups(keys, answers) if self.kind == "triples"
                              else kmeans_groups(matrix, self.config.groups, self.config.seed))
        count = int(labels.max()) + 1
        if count < 2:
            raise MMGuardError("wrong-target needs at least two groups of images (two "
                               "different answers, or --groups 2 or more)")
        centroids = torch.stack([matrix[labels == g].mean(dim=0) for g in range(count)])
        group_of = {key: int(label) for key, label in zip(keys, labels, strict=True)}
        if self.config.pairing == "nearest":
            shift, target_image_of = self._nearest_targets(keys, matrix, labels)
        else:
            shift, target_image_of = self._random_targets(keys, group_of, count)
        return {"group_of": group_of, "target_of": {key: shift[g] for key, g in group_of.items()},
                "target_image_of": target_image_of, "centroids": centroids.tolist(),
                # Distances in units of the mean distance between centroids, so the
                # temperature means the same in every feature space.
                "scale": mean_centroid_distance(matrix, labels.tolist())}

    def _random_targets(self, keys: list[str], group_of: dict[str, int],
                        count: int) -> tuple[dict[int, int], dict[str, str]]:
        generator = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(count, generator=generator).tolist()
        shift = {order[i]: order[(i + 1) % count] for i in range(count)}  # no fixed point
        members = {g: [key for key in keys if group_of[key] == g] for g in range(count)}
        for g in members:  # a seeded order, cycled below so each target is used alike
            members[g] = [members[g][i] for i in torch.randperm(len(members[g]),
                                                                generator=generator)]
        target_image_of, used = {}, dict.fromkeys(members, 0)
        for key in keys:
            target = shift[group_of[key]]
            target_image_of[key] = members[target][used[target] % len(members[target])]
            used[target] += 1
        return shift, target_image_of

    def _nearest_targets(self, keys: list[str], matrix: torch.Tensor,
                         labels: torch.Tensor) -> tuple[dict[int, int], dict[str, str]]:
        if self.parts:  # each member in its own units, or the larger tower decides
            matrix = torch.cat([matrix[:, part] / mean_centroid_distance(matrix[:, part],
                                                                         labels.tolist())
                                for part in self.parts], dim=1)
        count = int(labels.max()) + 1
        centroids = torch.stack([matrix[labels == g].mean(dim=0) for g in range(count)])
        shift = dict(enumerate(nearest_derangement(torch.cdist(centroids, centroids))))
        target_image_of = {}
        for g, h in shift.items():
            sources = (labels == g).nonzero().flatten().tolist()
            targets = (labels == h).nonzero().flatten().tolist()
            chosen = balanced_nearest(torch.cdist(matrix[sources], matrix[targets]))
            target_image_of.update({keys[s]: keys[targets[c]]
                                    for s, c in zip(sources, chosen, strict=True)})
        return shift, target_image_of

    # -- the noise step -------------------------------------------------------------------
    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(features, self.centroids.to(features.device)) / self.scale
        return -distances / self.config.temperature

    def _target_features(self, items: list[ProtectionItem],
                         features_of: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        features_of = self.features_of if features_of is None else features_of
        return torch.stack([features_of[self.target_image_of[item.key]]
                            for item in items]).to(self.device)

    def _pretrained_collision(self, items: list[ProtectionItem],
                              images: list[torch.Tensor]) -> torch.Tensor:
        """The collision loss on the pretrained tower (pretrained_too), in its own units."""
        assert self.pretrained is not None
        wanted = self._target_features(items, self.pretrained_features_of)
        with self.pretrained.perturbation_mode(self.batch_statistics):
            distance = self.pretrained.image_features(images) - wanted
        return distance.pow(2).sum(dim=1).mean() / self.pretrained_scale ** 2

    def noise_loss(self, items: list[ProtectionItem], texts: list[TextItem], reference: Any,
                   generator: torch.Generator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        if self.config.target == "image":
            wanted = self._target_features(items)

            def collision(images: list[torch.Tensor]) -> torch.Tensor:
                if self.parts:
                    loss = sum((features - wanted[:, part]).pow(2).sum(dim=1).mean() / scale ** 2
                               for features, part, scale in zip(
                                   self.surrogate.image_feature_parts(images), self.parts,
                                   self.part_scales, strict=True))
                else:
                    distance = self.surrogate.image_features(images) - wanted
                    loss = distance.pow(2).sum(dim=1).mean() / self.scale ** 2
                if self.pretrained is not None:
                    loss = loss + self._pretrained_collision(items, images)
                return loss

            return collision
        targets = torch.tensor([self.target_of[item.key] for item in items], device=self.device)

        def loss(images: list[torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(self._logits(self.surrogate.image_features(images)), targets)

        return loss

    @torch.no_grad()
    def measure(self, items: list[ProtectionItem], images: list[torch.Tensor],
                texts: list[TextItem], reference: Any) -> dict[str, float]:
        with self.surrogate.perturbation_mode(self.batch_statistics):
            features = self.surrogate.image_features(images).cpu()
        logits = self._logits(features)
        nearest = logits.argmax(dim=1)
        targets = torch.tensor([self.target_of[item.key] for item in items])
        own = torch.tensor([self.group_of[item.key] for item in items])
        clean = torch.stack([self.features_of[item.key] for item in items])
        wanted = self._target_features(items).cpu()
        measured = {"train_loss": float(F.cross_entropy(logits, targets)),
                    "share_at_target": float((nearest == targets).float().mean()),
                    "share_at_own_group": float((nearest == own).float().mean()),
                    # 1 = not moved toward the target image, 0 = on it.
                    "target_distance_ratio": _distance_ratio(features, clean, wanted)}
        for index, part in enumerate(self.parts):  # how far each member moved
            measured[f"member_{index}_distance_ratio"] = _distance_ratio(
                features[:, part], clean[:, part], wanted[:, part])
        if self.pretrained is not None:
            with self.pretrained.perturbation_mode(self.batch_statistics):
                features = self.pretrained.image_features(images).cpu()
            clean = torch.stack([self.pretrained_features_of[item.key] for item in items])
            wanted = self._target_features(items, self.pretrained_features_of).cpu()
            measured["pretrained_target_distance_ratio"] = _distance_ratio(features, clean,
                                                                           wanted)
        return measured

    def report(self) -> dict[str, Any]:
        report = super().report()
        if hasattr(self, "centroids"):
            report["groups"] = int(self.centroids.shape[0])
        return report


def _distance_ratio(features: torch.Tensor, clean: torch.Tensor, wanted: torch.Tensor) -> float:
    """Mean over items of |features - wanted| / |clean - wanted|."""
    start = (clean - wanted).norm(dim=1).clamp(min=1e-8)
    return float(((features - wanted).norm(dim=1) / start).mean())
