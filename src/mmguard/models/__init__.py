"""Surrogate and attacker models behind small contracts, chosen by name."""
