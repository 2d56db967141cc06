"""The contract for CLIP-style models, and the symmetric InfoNCE loss.

Every surrogate and attacker for image-caption data implements
`ContrastiveModel`. Protection code only talks to this contract: pixels in
[0, 1] at their stored size go through `preprocess` (differentiable); captions
go through `tokenize`; HotFlip reads the `token_embeddings` table and gets
gradients at chosen token positions via `encode_text(ids, replace_embeddings=...)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.models.preprocess import ImagePreprocess

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


class ContrastiveModel(nn.Module, ABC):
    """An image tower and a text tower trained to agree on matching pairs.

    Subclasses set `preprocess`, `context_length`, and implement the abstract
    methods. Features returned by `encode_*` are L2-normalised.
    """

    preprocess: ImagePreprocess
    context_length: int

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) -> normalised image features (B, D)."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> token ids (B, context_length), truncated to fit."""

    @abstractmethod
    def encode_text(self, ids: torch.Tensor,
                    replace_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> normalised text features (B, D).

        With `replace_embeddings` (B, L, E), those input embeddings are used in
        place of the table lookup, so gradients w.r.t. them are available.
        """

    @property
    @abstractmethod
    def token_embeddings(self) -> nn.Embedding:
        """The input token-embedding table (vocabulary x width)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Token ids (no special tokens) -> text."""

    @abstractmethod
    def word_token_ids(self) -> list[int]:
        """Ids of tokens that are a whole word on their own.

        Decoding one and tokenizing the text back gives the same single id, so
        a trigger made of them survives being written as plain text.
        """

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """The learnable log temperature (a scalar parameter)."""

    @abstractmethod
    def text_token_ids(self, text: str) -> list[int]:
        """The caption's own token ids, without start/end tokens or padding."""

    @abstractmethod
    def compose_ids(self, prefix: Sequence[int], text_ids: Sequence[int]) -> torch.Tensor:
        """Ids (context_length,) of `prefix` tokens followed by the caption's tokens.

        Equals `tokenize([decode(prefix) + " " + text])[0]` when the prefix is
        made of `word_token_ids` (tested); the caption's tail is cut first when
        the context is too short, so the trigger always survives.
        """

    @abstractmethod
    def head_parameters(self) -> list[nn.Parameter]:
        """The projection heads and temperature: what the `projection` recipe trains."""

    @property
    @abstractmethod
    def trigger_offset(self) -> int:
        """Index of the first caption token (after the start token)."""

    def image_tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, S, S) -> (B, D) what the image tower hands its projection head:
        what an attacker who freezes the tower trains on (default: the final features)."""
        return self.encode_pixels(pixels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at any size -> normalised features (B, D)."""
        return self.encode_pixels(self.preprocess(images))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts).to(self.device))

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return scale * image_features @ text_features.T


def info_nce(logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Symmetric InfoNCE over a batch where pair i is (image i, text i).

    With reduction="none", returns the per-pair loss (B,): the average of
    image i's and text i's cross-entropy terms.
    """
    targets = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, targets, reduction=reduction)
    text_to_image = F.cross_entropy(logits.T, targets, reduction=reduction)
    return (image_to_text + text_to_image) / 2
