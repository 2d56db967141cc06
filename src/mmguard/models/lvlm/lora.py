"""LoRA adapters injected into an LVLM adapter's model in place (peft), for attackers
and for the inner adaptation of MMGuard's surrogates."""

from __future__ import annotations

from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import LVLMAdapter


def inject_lora(adapter: LVLMAdapter, rank: int, alpha: int, dropout: float,
                include_mlp: bool = False) -> list[nn.Parameter]:
    """Add LoRA to the language model's attention (and MLP) projections; returns its weights.

    Works on any nn.Module (the embedded LVLMs are not peft models). The new
    weights start as an exact no-op (LoRA's B matrices are zero).
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = adapter.lora_target_modules(include_mlp)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    try:
        inject_adapter_in_model(config, adapter.model)
    except ValueError as exc:
        raise MMGuardError(f"{adapter.name}: cannot add LoRA to {targets}: {exc}") from None
    return [p for name, p in adapter.model.named_parameters() if ".lora_" in name]
