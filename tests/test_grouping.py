"""The greedy pairings behind wrong-target's `pairing nearest`."""

from __future__ import annotations

import pytest
import torch

from mmguard.protect.grouping import balanced_nearest, nearest_derangement


def test_nearest_derangement_sends_each_group_to_its_nearest_free_group():
    # groups 0-1 and 2-3 lie close in pairs, far from each other
    points = torch.tensor([[0.0], [1.0], [10.0], [11.5]])
    assert nearest_derangement(torch.cdist(points, points)) == [1, 0, 3, 2]


def test_nearest_derangement_repairs_the_one_group_greedy_leaves_on_itself():
    # greedy pairs 0 -> 1 and 1 -> 0 first; 2's only free target is then itself
    points = torch.tensor([[0.0], [1.0], [10.0]])
    target = nearest_derangement(torch.cdist(points, points))
    assert sorted(target) == [0, 1, 2]
    assert all(target[g] != g for g in range(3))
    for count in range(2, 9):  # any shape of distances gives a derangement
        distances = torch.rand(count, count, generator=torch.Generator().manual_seed(count))
        target = nearest_derangement(distances)
        assert sorted(target) == list(range(count)) and all(t != g for g, t in enumerate(target))
    with pytest.raises(ValueError, match="two groups"):
        nearest_derangement(torch.zeros(1, 1))


def test_balanced_nearest_picks_near_targets_within_a_capacity():
    sources = torch.tensor([[0.0], [0.1], [0.2], [5.0]])
    targets = torch.tensor([[0.0], [5.0]])
    # capacity 2: the three sources near 0 cannot all take target 0
    chosen = balanced_nearest(torch.cdist(sources, targets))
    assert chosen[3] == 1 and chosen[:3].count(0) == 2 and chosen[:3].count(1) == 1
    # as many sources as targets: each target once
    assert balanced_nearest(torch.cdist(sources[:2], targets)) == [0, 1]
