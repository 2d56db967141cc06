"""LVLM surrogates and attackers by name (the same name on both sides is white box).

- smolvlm-lite, smolvlm-lite-b: the embedded pretrained LVLMs (offline weights);
- smolvlm-lite-c: the same recipe on a DINOv2 ViT-S/14 tower, the black box whose
  vision tower shares neither architecture nor training with the other two;
- smolvlm-lite-d: the same recipe on the open_nsfw ResNet-50 tower, a third family:
  the black box of an ensemble of smolvlm-lite and smolvlm-lite-c;
- smolvlm-lite-e: the same recipe on a VGG16 tower (HED), a fourth family: the
  black box of an ensemble of the other three;
- lvlm-test: a tiny random embedded LVLM for tests;
- llava-tiny, qwen2-vl-tiny, idefics3-tiny: tiny random configs of the real
  Hugging Face classes (tests, CPU checks);
- any Hugging Face checkpoint id containing "/" (e.g. llava-hf/llava-1.5-7b-hf,
  Qwen/Qwen2-VL-2B-Instruct, HuggingFaceTB/SmolVLM-256M-Instruct): the family
  is read from its config (needs the hub or a local copy; a GPU for 7B).
"""

from __future__ import annotations

from pathlib import Path

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import LVLMAdapter
from mmguard.models.lvlm.embedded import EMBEDDED_SPECS, create_embedded


def lvlm_models() -> dict[str, str]:
    from mmguard.models.lvlm.hf_families import HF_LVLM_MODELS

    return {**{name: spec.description for name, spec in EMBEDDED_SPECS.items()},
            **HF_LVLM_MODELS}


def create_lvlm(name: str, device: str = "cpu", projector: Path | None = None,
                seed: int = 0) -> LVLMAdapter:
    """Build an LVLM adapter by registry name, on `device`, in eval mode."""
    if name in EMBEDDED_SPECS:
        adapter = create_embedded(name, projector, seed)
    else:
        from mmguard.models.lvlm.hf_families import create_hf_lvlm

        if projector is not None:
            raise MMGuardError("--projector applies to the embedded LVLMs only")
        adapter = create_hf_lvlm(name, seed)
        if adapter is None:
            raise MMGuardError(f"unknown LVLM {name!r}; available: "
                               f"{', '.join(lvlm_models())}, or a Hugging Face checkpoint id")
    adapter.model.to(device)
    adapter.model.eval()
    return adapter
