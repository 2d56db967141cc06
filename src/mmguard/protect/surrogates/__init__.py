"""Surrogate models behind one contract (`base.Surrogate`), one file per model family.

    surrogate = create_surrogate(("rn-tiny",), device="cpu", seed=0)

Adding a model family is one file implementing `Surrogate` plus one line in
`SURROGATE_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmguard.errors import MMGuardError
from mmguard.models.families import FAMILY_OF_KIND, Family, family_of
from mmguard.protect.surrogates.base import Surrogate, TextItem, TriggerSearch
from mmguard.protect.surrogates.contrastive import ContrastiveSurrogate
from mmguard.protect.surrogates.lvlm import LVLMSurrogate

SURROGATE_FAMILIES: dict[Family, type[Surrogate]] = {
    "contrastive": ContrastiveSurrogate,
    "lvlm": LVLMSurrogate,
}
# The surrogate a method uses when none is named, by the kind of data it protects.
DEFAULT_SURROGATES: dict[str, tuple[str, ...]] = {"pairs": ("rn-tiny",),
                                                  "triples": ("smolvlm-lite",)}

__all__ = ["DEFAULT_SURROGATES", "SURROGATE_FAMILIES", "Surrogate", "TextItem", "TriggerSearch",
           "create_surrogate", "surrogate_family"]


def surrogate_family(names: Sequence[str], kind: str | None = None) -> Family:
    """The one family all `names` belong to; unknown names and mixtures are errors.

    With `kind`, the family must also train on that kind of data.
    """
    families = {name: family_of(name, "surrogate") for name in names}
    found = set(families.values())
    if len(found) != 1:
        raise MMGuardError("the surrogates of one run must be of one family: "
                           + ", ".join(f"{name} ({family})" for name, family in families.items()))
    family = found.pop()
    if kind is not None and FAMILY_OF_KIND[kind] != family:
        raise MMGuardError(f"surrogate {', '.join(names)} is a {family} model, which does not "
                           f"learn from {kind}; use a {FAMILY_OF_KIND[kind]} surrogate")
    return family


def create_surrogate(names: Sequence[str], **options: Any) -> Surrogate:
    """Build the surrogate (or ensemble) for these registry names; `options` are the
    family's constructor arguments (device, seed, lr, pretrained, trainable, loss options)."""
    return SURROGATE_FAMILIES[surrogate_family(names)](list(names), **options)
