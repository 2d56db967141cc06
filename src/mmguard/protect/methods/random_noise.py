"""Uniform random noise in the L-infinity ball: the control every method must beat."""

from __future__ import annotations

import torch

from mmguard.data.budget import project_to_ball
from mmguard.protect.base import MethodConfig, ProtectedItem, ProtectionItem, ProtectionMethod
from mmguard.protect.seeding import item_generator


class RandomNoise(ProtectionMethod):
    """delta ~ U(-eps, eps) per pixel and channel, then clipped to [0, 1].

    No model, no trigger. Unlearnable-examples papers (Huang et al. 2021; MEM,
    Liu et al. 2023) report it as the baseline that does not protect.

    Config: eps (8/255), seed (0).

    Example:
        method = RandomNoise(MethodConfig(eps=8 / 255, seed=0))
        [out] = method.protect_batch([ProtectionItem("a.png", image, ["a cat"])])
    """

    name = "random"
    summary = "uniform noise in the eps-ball (control, protects nothing)"
    Config = MethodConfig

    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        eps = self.config.eps
        protected = []
        for item in batch:
            generator = item_generator(self.config.seed, item.key)
            noise = torch.rand(item.image.shape, generator=generator) * (2 * eps) - eps
            protected.append(ProtectedItem(project_to_ball(item.image + noise, item.image, eps)))
        return protected
