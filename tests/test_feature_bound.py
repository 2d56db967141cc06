"""benchmarks/feature_bound.py: linear heads on cached features bound the frozen-tower attacker."""

from __future__ import annotations

import torch

from benchmarks.feature_bound import score, train_heads


def _features(n: int = 96, dim: int = 32, seed: int = 0):
    """Image features that are a noisy linear map of the text features, train and test."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=generator)

    def draw(count):
        text = torch.randn(count, dim, generator=generator)
        return text @ mix + 0.1 * torch.randn(count, dim, generator=generator), text

    train_images, train_text = draw(n)
    test_images, test_text = draw(n)
    return train_images, train_text, {"test_images": test_images, "test_text": test_text}


def test_heads_learn_an_aligned_set_and_not_a_collided_one():
    train_images, train_text, test = _features()
    learned = score(train_heads(train_images, train_text, seed=0, epochs=30, lr=1e-2), test)
    # Every image moved onto another image's features: nothing to learn about the link.
    collided = train_images[torch.randperm(len(train_images),
                                           generator=torch.Generator().manual_seed(1))]
    fooled = score(train_heads(collided, train_text, seed=0, epochs=30, lr=1e-2), test)
    assert learned["i2t R@10"] > 60 and learned["i2t MedR"] <= 5
    assert fooled["i2t MedR"] > 20 > learned["i2t MedR"]
