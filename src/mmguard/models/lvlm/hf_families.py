"""Hugging Face LVLM families (LLaVA, Qwen2-VL, Idefics3/SmolVLM): placeholder until built."""

from __future__ import annotations

from mmguard.models.lvlm.base import LVLMAdapter

HF_LVLM_MODELS: dict[str, str] = {}


def create_hf_lvlm(name: str, seed: int = 0) -> LVLMAdapter | None:
    return None
