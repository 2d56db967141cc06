"""Per-item random generators, so outputs do not depend on order or batching."""

from __future__ import annotations

import hashlib

import torch


def item_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (run seed, item key).

    Seeding per item makes an item's output the same whether the run went
    straight through, was resumed, or used another batch size.
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
    return generator
