"""Word-keyed synthetic shortcut: each image carries a code spelled from the words of its text.

Why (issue 12, attackers who train the image tower): `wrong-target` moves the
features of a frozen pretrained tower, which an attacker who fine-tunes that
tower or trains from scratch does not keep (docs/findings.md §9, §11). A
synthetic shortcut needs no tower: shortcuts that work are simple and linearly
separable (Yu et al. KDD 2022). `class-pattern` gives one pattern per k-means
cluster, which a contrastive learner cannot use, because its batch must tell
apart the captions *within* a cluster. Here every word w of the vocabulary has
a fixed random ±1 pattern P_w, and an image whose texts hold the words W gets

    delta = eps * sign(sum over w in W of P_w)

(on a grid `coarse` times coarser than the image, bilinearly upsampled). The
code is as distinct as the captions are, and images whose captions share
words share part of their code, just as a text encoder's features do: an image
tower can match each caption by reading the words off the noise, a linear
task much easier than seeing what the image shows. On clean images the code is
absent, and what the tower learned does not apply.

Texts: the captions for pairs, the responses for triples (the attacker learns
to produce them; the prompts are the same for many images). Words are runs of
letters and digits, lower-cased; a text without any gets the image's own
random code. No model is involved, so protection takes no
time and needs no download.

Config (WordCodeConfig): eps (8/255), seed (0), coarse (1), gray_noise (off).

Example:
    mmguard protect --dataset emoji --method word-code --out out/
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mmguard.data.budget import project_to_ball
from mmguard.protect.base import (
    MethodConfig,
    ProtectedItem,
    ProtectionItem,
    ProtectionMethod,
    cells_option,
    coarse_option,
    gray_noise_option,
)
from mmguard.protect.pgd import grid_size, upsample_noise
from mmguard.protect.seeding import item_generator

WORD = re.compile(r"[^\W_]+")


def words_of(texts: list[str]) -> list[str]:
    """The distinct words of `texts`, lower-cased, in a fixed (sorted) order."""
    return sorted({word for text in texts for word in WORD.findall(text.lower())})


@dataclass
class WordCodeConfig(MethodConfig):
    coarse: int = coarse_option()
    cells: int = cells_option()
    gray_noise: bool = gray_noise_option()


class WordCode(ProtectionMethod):
    name = "word-code"
    summary = "a fixed random pattern per word, summed over each image's text (shortcut)"
    Config = WordCodeConfig
    config: WordCodeConfig

    def word_pattern(self, word: str, shape: tuple[int, int, int]) -> torch.Tensor:
        """P_w on the noise grid: cells of +-1, drawn from the run's seed and the word."""
        generator = item_generator(self.config.seed, f"word {word} {shape}")
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).float()

    def code(self, item: ProtectionItem) -> torch.Tensor:
        """The item's noise in [-eps, eps], at the image's size."""
        channels, height, width = item.image.shape
        shape = (1 if self.config.gray_noise else channels,
                 *grid_size(item.image, self.config.coarse, self.config.cells))
        texts = item.responses if item.responses else item.texts
        words = words_of(texts)
        total = torch.zeros(shape)
        for word in words:
            total += self.word_pattern(word, shape)
        # An even number of words can cancel in a cell; those cells take a draw keyed by
        # the word set, so the code stays +-eps everywhere and a function of the words.
        # A text of symbols only has no words and gets the image's own code.
        tie = self.word_pattern("\0tie " + (" ".join(words) or f"\0image {item.key}"), shape)
        cells = torch.where(total == 0, tie, torch.sign(total))
        noise = upsample_noise(cells, (height, width)) * self.config.eps
        return noise.expand(channels, height, width)

    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        return [ProtectedItem(project_to_ball(item.image + self.code(item), item.image,
                                              self.config.eps))
                for item in batch]
