"""Grouping a dataset's images without labels: by answer (triples) or by k-means on a
frozen tower's features (pairs). Used by the methods that share or target per group."""

from __future__ import annotations

import torch

from mmguard.protect.base import DatasetView, ProtectionItem
from mmguard.protect.surrogates import Surrogate


def answer_of(item: ProtectionItem) -> str:
    """The item's set of responses as one string: items answered alike share it."""
    return " | ".join(sorted({response.strip() for response in item.responses or []}))


def dataset_answers(data: DatasetView, batch_size: int) -> dict[str, str]:
    """Every good image's answer (`answer_of`) by key, loading the data batch by batch."""
    return {item.key: answer_of(item) for start in range(0, len(data.keys), batch_size)
            for item in data.load(data.keys[start:start + batch_size])}


def pattern_name(item: ProtectionItem, kind: str, cluster: int) -> str:
    """The name a group's fixed pattern is seeded by (`group_pattern`): its answer for
    triples, its cluster otherwise. Methods that share class-pattern's patterns use it,
    so the same group draws the same pattern in each."""
    return f"answer {answer_of(item)}" if kind == "triples" else f"cluster {cluster}"


def dataset_feature_parts(data: DatasetView, surrogate: Surrogate, batch_size: int,
                          device: torch.device | str = "cpu",
                          batch_statistics: bool = False) -> tuple[list[str], list[torch.Tensor],
                                                                   dict[str, str]]:
    """Every image's frozen-tower features, one (N, D_k) matrix per ensemble member (one
    for a single model), with the keys in that order and each key's answer (empty for
    pairs); one pass over the data, batch by batch."""
    keys, batches, answers = [], [], {}
    with torch.no_grad(), surrogate.perturbation_mode(batch_statistics):
        for start in range(0, len(data.keys), batch_size):
            items = data.load(data.keys[start:start + batch_size])
            keys += [item.key for item in items]
            answers.update({item.key: answer_of(item) for item in items})
            batches.append([part.cpu() for part in surrogate.image_feature_parts(
                [item.image.to(device) for item in items])])
    parts = [torch.cat([batch[k] for batch in batches]) for k in range(len(batches[0]))]
    return keys, parts, answers


def dataset_features(data: DatasetView, surrogate: Surrogate, batch_size: int,
                     device: torch.device | str = "cpu",
                     batch_statistics: bool = False) -> tuple[list[str], torch.Tensor,
                                                              dict[str, str]]:
    """`dataset_feature_parts` with the members' features side by side (N, D): what
    `Surrogate.image_features` gives."""
    keys, parts, answers = dataset_feature_parts(data, surrogate, batch_size, device,
                                                 batch_statistics)
    return keys, torch.cat(parts, dim=1), answers


def answer_groups(keys: list[str], answers: dict[str, str]) -> list[int]:
    """Group index per key: one group per distinct answer, in sorted answer order."""
    names = sorted(set(answers.values()))
    return [names.index(answers[key]) for key in keys]


def kmeans_groups(features: torch.Tensor, clusters: int, seed: int) -> list[int]:
    """Group index per row of `features`: k-means with `clusters` clusters (fewer if fewer rows)."""
    from sklearn.cluster import KMeans

    fitted = KMeans(n_clusters=min(clusters, len(features)), n_init=4, random_state=seed)
    return [int(label) for label in fitted.fit_predict(features.double().numpy())]


def mean_centroid_distance(matrix: torch.Tensor, labels: list[int]) -> float:
    """The mean distance between the group centroids of `matrix`: the unit of the losses,
    so a temperature or a sum of two towers' losses means the same in every feature space."""
    label = torch.tensor(labels)
    centroids = torch.stack([matrix[label == g].mean(dim=0) for g in sorted(set(labels))])
    count = len(centroids)
    return float(torch.cdist(centroids, centroids).sum() / max(1, count * (count - 1)))


def nearest_derangement(distances: torch.Tensor) -> list[int]:
    """A permutation with no fixed point that maps each group to a near one: greedy over
    the off-diagonal entries of the (G, G) group `distances`, nearest pair first.

    Greedy leaves at most one group unplaced, and only when the one target left is
    itself; it then takes the target of a placed group, which takes it instead."""
    count = len(distances)
    if count < 2:
        raise ValueError("a derangement needs at least two groups")
    target: dict[int, int] = {}
    taken: set[int] = set()
    order = sorted((float(distances[g, h]), g, h) for g in range(count) for h in range(count)
                   if g != h)
    for _, g, h in order:
        if g not in target and h not in taken:
            target[g] = h
            taken.add(h)
    for g in range(count):
        if g not in target:  # only g itself is left: swap with a placed group
            other = next(iter(target))
            target[g], target[other] = target[other], g
    return [target[g] for g in range(count)]


def balanced_nearest(distances: torch.Tensor) -> list[int]:
    """For each row (a source image) a column (a target image) near it, each column used
    by at most ceil(rows / columns) rows: greedy over `distances`, nearest pair first."""
    rows, columns = distances.shape
    capacity = -(-rows // columns)
    chosen: dict[int, int] = {}
    uses = [0] * columns
    for flat in torch.argsort(distances.flatten()).tolist():
        row, column = divmod(flat, columns)
        if row not in chosen and uses[column] < capacity:
            chosen[row] = column
            uses[column] += 1
            if len(chosen) == rows:
                break
    return [chosen[row] for row in range(rows)]
