"""Uniform random noise in the L-infinity ball: the control every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

from mmguard.data.budget import project_to_ball
from mmguard.protect.base import (
    MethodConfig,
    ProtectedItem,
    ProtectionItem,
    ProtectionMethod,
    cells_option,
    coarse_option,
    gray_noise_option,
    noise_values_option,
    random_noise,
)
from mmguard.protect.seeding import item_generator


@dataclass
class RandomConfig(MethodConfig):
    coarse: int = coarse_option()
    cells: int = cells_option()
    gray_noise: bool = gray_noise_option()
    values: str = noise_values_option()


class RandomNoise(ProtectionMethod):
    """delta ~ U(-eps, eps) per pixel and channel, then clipped to [0, 1]; with `coarse`
    or `gray_noise`, drawn on a coarser grid (bilinearly upsampled) or in one channel;
    with `values` sign, each cell is +-eps (the per-image control of class-pattern).

    No model, no trigger. Unlearnable-examples papers (Huang et al. 2021; MEM,
    Liu et al. 2023) report it as the baseline that does not protect.

    Config: eps (8/255), seed (0), coarse (1), gray_noise (off), values (uniform).

    Example:
        method = RandomNoise(RandomConfig(eps=8 / 255, seed=0))
        [out] = method.protect_batch([ProtectionItem("a.png", image, ["a cat"])])
    """

    name = "random"
    summary = "uniform noise in the eps-ball (control, protects nothing)"
    Config = RandomConfig
    config: RandomConfig

    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        eps, coarse = self.config.eps, self.config.coarse
        protected = []
        for item in batch:
            noise = random_noise(item.image, eps, coarse, self.config.gray_noise,
                                 self.config.values, item_generator(self.config.seed, item.key),
                                 self.config.cells)
            protected.append(ProtectedItem(project_to_ball(item.image + noise, item.image, eps)))
        return protected
