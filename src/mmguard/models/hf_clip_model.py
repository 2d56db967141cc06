"""Hugging Face `CLIPModel` as a ContrastiveModel.

Real checkpoints load with `HFClipModel.from_pretrained("openai/clip-vit-base-patch32")`
(registry name `hf:openai/clip-vit-base-patch32`) where a hub is reachable.
Offline, the model is built from a `CLIPConfig`, and the tokenizer from
open_clip's bundled BPE vocabulary: transformers ships no CLIP vocabulary
files, but open_clip's `SimpleTokenizer` holds the same 49,408-token vocabulary
and merges that OpenAI's CLIP uses, so `CLIPTokenizer` built from them
tokenizes identically (tested).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from mmguard.models.contrastive import ContrastiveModel
from mmguard.models.hf_tokens import HuggingFaceTokens
from mmguard.models.preprocess import ImagePreprocess

# A scaled-down configuration for CPU work and tests (64 px, 2+2 layers).
TINY_CONFIG = {
    "projection_dim": 128,
    "text_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 32,
                    "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407,
                    "pad_token_id": 49407},
    "vision_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 64, "patch_size": 8},
}


@functools.lru_cache(maxsize=1)
def offline_clip_tokenizer_files() -> tuple[str, str]:
    """vocab.json and merges.txt written once from open_clip's bundled BPE vocabulary.

    They go to a cache folder named after the open_clip version, so every
    process reuses the same two files instead of writing new ones.
    """
    from importlib import metadata

    from open_clip.tokenizer import SimpleTokenizer

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = cache / "mmguard" / f"clip-vocab-{metadata.version('open_clip_torch')}"
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.exists() and merges.exists():
        return str(vocab), str(merges)
    folder.mkdir(parents=True, exist_ok=True)
    simple = SimpleTokenizer()
    # open_clip spells the special tokens <start_of_text>/<end_of_text>; OpenAI's
    # files, which CLIPTokenizer expects, spell them <|startoftext|>/<|endoftext|>.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = {renamed.get(token, token): index for token, index in simple.encoder.items()}
    ranked = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    _write_atomic(vocab, json.dumps(encoder))
    _write_atomic(merges, "#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in ranked)
                  + "\n")
    return str(vocab), str(merges)


def _write_atomic(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(tmp, path)


def offline_clip_tokenizer(context_length: int) -> CLIPTokenizer:
    vocab, merges = offline_clip_tokenizer_files()
    return CLIPTokenizer(vocab, merges, model_max_length=context_length)


class HFClipModel(HuggingFaceTokens, ContrastiveModel):
    """A transformers `CLIPModel` (random init from `config`, or a loaded one).

    Example:
        model = HFClipModel(CLIPConfig(**TINY_CONFIG))
        model = HFClipModel.from_pretrained("openai/clip-vit-base-patch32")  # needs the hub
    """

    def __init__(self, config: CLIPConfig | None = None, model: CLIPModel | None = None,
                 tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.clip = model if model is not None else CLIPModel(config)
        text_config, vision_config = self.clip.config.text_config, self.clip.config.vision_config
        self.context_length = text_config.max_position_embeddings
        self.tokenizer = tokenizer or offline_clip_tokenizer(self.context_length)
        self.start_token_id = self.tokenizer.bos_token_id
        self.end_token_id = self.tokenizer.eos_token_id
        self.preprocess = ImagePreprocess(vision_config.image_size, tuple(OPENAI_DATASET_MEAN),
                                          tuple(OPENAI_DATASET_STD))
        self._replacement: torch.Tensor | None = None
        self.token_embeddings.register_forward_hook(self._swap_embeddings)

    @classmethod
    def from_pretrained(cls, name: str) -> HFClipModel:
        from transformers import CLIPImageProcessor

        model = CLIPModel.from_pretrained(name)
        instance = cls(model=model, tokenizer=CLIPTokenizer.from_pretrained(name))
        processor = CLIPImageProcessor.from_pretrained(name)
        instance.preprocess = ImagePreprocess(processor.crop_size["height"],
                                              tuple(processor.image_mean),
                                              tuple(processor.image_std))
        return instance

    def _swap_embeddings(self, module, inputs, output):
        return self._replacement

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)), dim=-1)

    def encode_text(self, ids: torch.Tensor,
                    replace_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        self._replacement = replace_embeddings
        try:
            return F.normalize(_features(self.clip.get_text_features(input_ids=ids)), dim=-1)
        finally:
            self._replacement = None

    @property
    def token_embeddings(self) -> nn.Embedding:
        return self.clip.text_model.embeddings.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def trigger_offset(self) -> int:
        return 1

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.clip.visual_projection.parameters(),
                *self.clip.text_projection.parameters(), self.clip.logit_scale]

    def word_of(self, piece: str) -> str | None:
        # CLIP's BPE marks a word-final piece with "</w>".
        return piece[:-4] if piece.endswith("</w>") else None


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projection.
    return output.pooler_output if hasattr(output, "pooler_output") else output
