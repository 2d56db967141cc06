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


def trigger_vocabulary(model: ContrastiveModel, natural: bool) -> torch.Tensor:
    ids = model.word_token_ids()
    if natural:
        words = english_words()
        ids = [i for i in ids if model.decode([i]) in words]
    if not ids:
        raise MMGuardError("no usable trigger tokens in this model's vocabulary")
    return torch.tensor(ids, dtype=torch.long)
