"""Token handling shared by models whose tokenizer is a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HuggingFaceTokens:
    """Mixin: tokenize / compose / decode / word tokens for a `self.tokenizer`.

    The host class sets `tokenizer`, `context_length`, `start_token_id` and
    `end_token_id`, and may override `word_of(piece)` for its vocabulary's
    spelling of whole words (CLIP's BPE marks them with "</w>").
    """

    tokenizer: object
    context_length: int
    start_token_id: int
    end_token_id: int

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt")["input_ids"]

    def text_token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def compose_ids(self, prefix: Sequence[int], text_ids: Sequence[int]) -> torch.Tensor:
        body = ([int(i) for i in prefix] + [int(i) for i in text_ids])[: self.context_length - 2]
        ids = [self.start_token_id, *body, self.end_token_id]
        padding = [self.tokenizer.pad_token_id] * (self.context_length - len(ids))
        return torch.tensor(ids + padding, dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids]).strip()

    def word_of(self, piece: str) -> str | None:
        return piece

    def word_token_ids(self) -> list[int]:
        ids = []
        for piece, index in self.tokenizer.get_vocab().items():
            word = self.word_of(piece)
            if word and len(word) >= 2 and word.isascii() and word.isalpha() \
                    and self.text_token_ids(word) == [index]:
                ids.append(index)
        return sorted(ids)
