"""Hugging Face LVLM families by name: tiny random configs, or any checkpoint id.

- `llava-tiny`, `qwen2-vl-tiny`, `qwen2.5-vl-tiny`, `idefics3-tiny`: tiny random configs of the real
  classes with SmolLM2's tokenizer, built offline on a CPU in seconds (tests).
- a checkpoint id containing "/" (or a local folder): `AutoConfig` names the
  family (`config.model_type`: llava, qwen2_vl, qwen2_5_vl, idefics3, smolvlm);
  the model is loaded with `from_pretrained(attn_implementation="eager")`, because
  attention maps are part of the contract, in the checkpoint's own dtype
  (`dtype="auto"`: bf16/fp16 for most, so a 7B LLaVA fits a 24 GB GPU), with
  the checkpoint's own tokenizer (`AutoTokenizer`) and image processor
  (`AutoImageProcessor`, whose settings the adapter reproduces in torch). Not
  `AutoProcessor`: the adapter needs no more, and SmolVLM's processor imports
  `num2words` for video prompts. This needs the Hugging Face hub (or a local
  copy: set `HF_HUB_OFFLINE=1` and point at the cache).
"""

from __future__ import annotations

from collections.abc import Callable

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import LVLMAdapter

HF_LVLM_MODELS: dict[str, str] = {
    "llava-tiny": "random LlavaForConditionalGeneration (CLIP ViT 28 px, 16 image tokens, "
                  "2-layer Llama) with SmolLM2's tokenizer (tests)",
    "qwen2-vl-tiny": "random Qwen2VLForConditionalGeneration (2-block ViT, <= 84x84 px, "
                     "2-layer LM) with SmolLM2's tokenizer (tests)",
    "qwen2.5-vl-tiny": "random Qwen2_5_VLForConditionalGeneration (windowed 2-block ViT, "
                       "<= 84x84 px, 2-layer LM) with SmolLM2's tokenizer (tests)",
    "idefics3-tiny": "random Idefics3ForConditionalGeneration (32 px tiles, image splitting, "
                     "2-layer Llama) with SmolLM2's tokenizer (tests)",
}


def _tiny_builders() -> dict[str, Callable[[int], LVLMAdapter]]:
    from mmguard.models.lvlm.idefics3 import tiny_idefics3
    from mmguard.models.lvlm.llava import tiny_llava
    from mmguard.models.lvlm.qwen2_vl import tiny_qwen2_vl

    return {"llava-tiny": tiny_llava, "qwen2-vl-tiny": tiny_qwen2_vl,
            "qwen2.5-vl-tiny": lambda seed: tiny_qwen2_vl(seed, version="2.5"),
            "idefics3-tiny": tiny_idefics3}


def _families() -> dict[str, tuple[str, type]]:
    """config.model_type -> (transformers model class name, adapter class)."""
    from mmguard.models.lvlm.idefics3 import Idefics3Adapter
    from mmguard.models.lvlm.llava import LlavaAdapter
    from mmguard.models.lvlm.qwen2_vl import Qwen2VLAdapter

    return {
        "llava": ("LlavaForConditionalGeneration", LlavaAdapter),
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", Qwen2VLAdapter),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", Qwen2VLAdapter),
        "idefics3": ("Idefics3ForConditionalGeneration", Idefics3Adapter),
        "smolvlm": ("SmolVLMForConditionalGeneration", Idefics3Adapter),
    }


def load_checkpoint(name: str) -> LVLMAdapter:
    """The adapter of a Hugging Face checkpoint (hub id or local folder), on the CPU.

    The family comes from the checkpoint's config; the model class is the
    family's `...ForConditionalGeneration`, with eager attention; tokenizer
    and image processor are the checkpoint's (the image processor with its
    default torchvision backend, the one the adapter reproduces).
    """
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(name)
    families = _families()
    if config.model_type not in families:
        raise MMGuardError(f"{name} is a {config.model_type!r} model; supported LVLM families: "
                           f"{', '.join(sorted(families))}")
    class_name, adapter_class = families[config.model_type]
    model = getattr(transformers, class_name).from_pretrained(
        name, config=config, attn_implementation="eager", dtype="auto")
    return adapter_class(name, model, AutoTokenizer.from_pretrained(name),
                         AutoImageProcessor.from_pretrained(name))


def create_hf_lvlm(name: str, seed: int = 0) -> LVLMAdapter | None:
    """A tiny config by registry name, a checkpoint for an id with "/", else None.

    `seed` sets the random weights of the tiny configs; checkpoints ignore it.
    """
    builders = _tiny_builders()
    if name in builders:
        return builders[name](seed)
    if "/" in name:
        return load_checkpoint(name)
    return None
