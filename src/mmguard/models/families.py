"""Model families by name: which family a model belongs to, and what data it trains on.

Every surrogate and attacker name belongs to one family, and the family alone
decides which code path handles it:

- "contrastive": CLIP-style models (`models/registry.py`), trained on
  image-caption pairs;
- "lvlm": generative vision-language models (`models/lvlm/registry.py`),
  trained on (image, prompt, response) triples.

This is the one place that decides it; no caller guesses from a name.
"""

from __future__ import annotations

from typing import Literal

from mmguard.errors import MMGuardError

Family = Literal["contrastive", "lvlm"]
FAMILIES: tuple[Family, ...] = ("contrastive", "lvlm")
# The dataset kind each family trains on.
DATA_KIND: dict[Family, str] = {"contrastive": "pairs", "lvlm": "triples"}
FAMILY_OF_KIND: dict[str, Family] = {kind: family for family, kind in DATA_KIND.items()}


def model_names() -> dict[Family, dict[str, str]]:
    """Family -> {registry name: one-line description}."""
    from mmguard.models.lvlm.registry import lvlm_models
    from mmguard.models.registry import CONTRASTIVE_MODELS

    return {"contrastive": dict(CONTRASTIVE_MODELS), "lvlm": lvlm_models()}


def family_of(name: str, role: str = "model") -> Family:
    """The family of a registry name; an unknown name is an error listing the known ones.

    `role` names the thing in the message ("surrogate", "attacker").
    """
    names = model_names()
    if name in names["contrastive"] or name.startswith(("hf:", "open_clip:")):
        return "contrastive"
    if name in names["lvlm"] or "/" in name:  # a Hugging Face LVLM checkpoint id
        return "lvlm"
    raise MMGuardError(f"unknown {role} {name!r}; contrastive models: "
                       f"{', '.join(names['contrastive'])}; LVLMs: {', '.join(names['lvlm'])} "
                       "or a Hugging Face checkpoint id (see `mmguard models`)")
