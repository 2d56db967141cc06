"""Which tokens a text trigger may use.

Plain triggers use every token that is a whole word on its own (so the
trigger survives being written as text and tokenized again). Natural triggers
(MEM section 4.4) keep only real English words from Debian's word list, so the
trigger reads like text; MEM reports that this smaller space protects somewhat
less.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mmguard.errors import MMGuardError
from mmguard.models.contrastive import ContrastiveModel

WORD_LIST = Path("/usr/share/dict/words")
MIN_NATURAL_LENGTH = 3


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    if not WORD_LIST.exists():
        raise MMGuardError(f"natural triggers need {WORD_LIST}: install the Debian package "
                           "wamerican (`make install` does)")
    words = WORD_LIST.read_text(encoding="utf-8", errors="ignore").split()
    # Lower-case entries only: capitalised ones are names and places.
    return frozenset(w for w in words
                     if w.isascii() and w.isalpha() and w.islower()
                     and len(w) >= MIN_NATURAL_LENGTH)


def trigger_vocabulary(model: ContrastiveModel, natural: bool, size: int | None = None,
                       seed: int = 0) -> torch.Tensor:
    """Allowed trigger token ids; with `size`, a fixed random subset of that many.

    A small vocabulary (an mmguard extension, not in MEM) makes images share
    trigger words, so noise patterns tied to a word can recur across images.
    """
    ids = model.word_token_ids()
    if natural:
        words = english_words()
        ids = [i for i in ids if model.decode([i]) in words]
    return _subset(ids, size, seed)


def lvlm_trigger_vocabulary(tokenizer, natural: bool, size: int | None = None,
                            seed: int = 0, embedding_rows: int | None = None) -> torch.Tensor:
    """Allowed ids for triggers inserted into LVLM prompts.

    A token qualifies when it decodes to a space followed by a whole ASCII
    word of two or more letters and " word" tokenizes back to it alone, so a
    trigger of k such tokens is k words that survive release as text (the
    exact check after insertion still runs per candidate). `embedding_rows`
    drops ids beyond the language model's embedding table (added special
    tokens).
    """
    words = english_words() if natural else None
    ids = []
    for index in range(len(tokenizer)):
        if embedding_rows is not None and index >= embedding_rows:
            break
        text = tokenizer.decode([index])
        word = text[1:]
        if not (text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha()):
            continue
        if words is not None and word not in words:
            continue
        if tokenizer(text, add_special_tokens=False)["input_ids"] == [index]:
            ids.append(index)
    return _subset(ids, size, seed)


def _subset(ids: list[int], size: int | None, seed: int) -> torch.Tensor:
    """The ids as a tensor; with `size`, a fixed random subset of that many."""
    if not ids:
        raise MMGuardError("no usable trigger tokens in this model's vocabulary")
    if size is not None and size < len(ids):
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(ids), generator=generator)[:size]
        ids = sorted(ids[i] for i in chosen.tolist())
    return torch.tensor(ids, dtype=torch.long)
