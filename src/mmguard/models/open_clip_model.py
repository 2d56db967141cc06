"""open_clip CLIP models (ModifiedResNet and ViT image towers) as ContrastiveModels.

Scaled-down architectures for CPU work are open_clip configs kept as JSON in
`configs/` (registered with open_clip at import); full sizes (RN50, RN101,
ViT-B-32, ...) are open_clip's own, with `pretrained=` passed straight to
`open_clip.create_model` for users who can download weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mmguard.models.contrastive import ContrastiveModel
from mmguard.models.preprocess import ImagePreprocess

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


class OpenClipModel(ContrastiveModel):
    """An open_clip `CLIP` behind the ContrastiveModel contract.

    Arguments:
        architecture: open_clip model name, e.g. "mmguard-rn-tiny" or "RN50".
        pretrained: open_clip pretrained tag or checkpoint path (None: random init).

    Example:
        model = OpenClipModel("mmguard-rn-tiny")
        loss = info_nce(model.logits(model.encode_images(images), model.encode_texts(captions)))
    """

    def __init__(self, architecture: str, pretrained: str | None = None):
        super().__init__()
        self.architecture = architecture
        with _quiet_random_init(pretrained is None):
            self.clip = open_clip.create_model(architecture, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.context_length = self.tokenizer.context_length
        cfg = open_clip.get_model_preprocess_cfg(self.clip)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.preprocess = ImagePreprocess(size, tuple(cfg["mean"]), tuple(cfg["std"]),
                                          cfg.get("interpolation", "bicubic"))
        self._replacement: torch.Tensor | None = None
        # The hook swaps the table lookup's output for caller-given embeddings,
        # so open_clip's own encode_text runs unchanged (no forked model code).
        self.clip.token_embedding.register_forward_hook(self._swap_embeddings)

    def _swap_embeddings(self, module, inputs, output):
        return self._replacement

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, ids: torch.Tensor,
                    replace_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        ids, replace_embeddings = self._drop_padding(ids, replace_embeddings)
        self._replacement = replace_embeddings
        try:
            if ids.shape[1] == self.context_length:
                return F.normalize(self.clip.encode_text(ids), dim=-1)
            return F.normalize(self._encode_short_text(ids), dim=-1)
        finally:
            self._replacement = None

    def _drop_padding(self, ids: torch.Tensor, replacement: torch.Tensor | None):
        """Cut the padding columns after the batch's last end-of-text token.

        Exact, not an approximation: the text tower is causal and pools at the
        end-of-text token, so no later position can change the feature. Captions
        fill about a third of CLIP's 77 positions, so this is the cheap part of
        every HotFlip scoring pass. Only for open_clip's own `CLIP` class with
        argmax pooling; anything else runs at full length.
        """
        if type(self.clip) is not open_clip.CLIP or self.clip.text_pool_type != "argmax" \
                or self.clip.attn_mask is None:
            return ids, replacement
        length = int(ids.argmax(dim=-1).max()) + 1
        if replacement is not None:
            replacement = replacement[:, :length]
        return ids[:, :length], replacement

    def _encode_short_text(self, ids: torch.Tensor) -> torch.Tensor:
        """open_clip's `CLIP.encode_text` on the first `ids.shape[1]` positions (same modules,
        same order; positional embeddings and the causal mask cut to that length)."""
        clip, length = self.clip, ids.shape[1]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(ids).to(cast_dtype)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return x @ clip.text_projection if not isinstance(clip.text_projection, nn.Linear) \
            else clip.text_projection(x)

    @property
    def token_embeddings(self) -> nn.Embedding:
        return self.clip.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def head_parameters(self) -> list[nn.Parameter]:
        visual = self.clip.visual
        # ModifiedResNet ends in attention pooling's output projection; ViT in `proj`.
        image_head = (list(visual.attnpool.c_proj.parameters()) if hasattr(visual, "attnpool")
                      else [visual.proj])
        return [*image_head, self.clip.text_projection, self.clip.logit_scale]

    @property
    def trigger_offset(self) -> int:
        return 1  # after <start_of_text>

    def text_token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def compose_ids(self, prefix: Sequence[int], text_ids: Sequence[int]) -> torch.Tensor:
        body = [int(i) for i in prefix] + [int(i) for i in text_ids]
        body = body[: self.context_length - 2]
        ids = [self.tokenizer.sot_token_id, *body, self.tokenizer.eot_token_id]
        return torch.tensor(ids + [0] * (self.context_length - len(ids)), dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids]).strip()

    def word_token_ids(self) -> list[int]:
        return list(_word_token_ids(self.architecture, self.tokenizer))


@functools.lru_cache(maxsize=8)
def _word_token_ids(architecture: str, tokenizer) -> tuple[int, ...]:
    # BPE marks word-final pieces with "</w>"; keep plain alphabetic words of two
    # or more letters that tokenize back to exactly themselves.
    found = []
    for piece, index in tokenizer.encoder.items():
        word = piece[:-4]
        if piece.endswith("</w>") and len(word) >= 2 and word.isascii() and word.isalpha() \
                and tokenizer.encode(word) == [index]:
            found.append(index)
    return tuple(sorted(found))


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(intended: bool):
    """Without pretrained weights open_clip warns, through the root logger, on every
    build that the model is randomly initialised; here that is the request (scratch
    attackers, test configs), so the notice is dropped. Other messages pass."""
    if not intended:
        yield
        return
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)
