"""Stage-1 alignment of an embedded LVLM: train only the projector on captions.

LLaVA's first stage: with the vision tower and the language model frozen, the
projector learns to map image features into the language model's input space
by predicting captions. mmguard aligns on public caption data that installs
offline (the emoji and digits training splits by default, both as triples
"Describe the image." -> caption), *not* on Fashion-MNIST, which is kept as the
downstream task the attackers fine-tune on. The result is a small safetensors
file (the projector only) that ships with mmguard, so loading the embedded
LVLMs never trains anything.

    mmguard align --model smolvlm-lite --out projector.safetensors
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, to_float
from mmguard.models.lvlm.base import TextExample
from mmguard.models.lvlm.embedded import EmbeddedAdapter
from mmguard.models.training import Trainer

ALIGN_PROMPTS = ("Describe the image.", "What is shown in this picture?",
                 "Give a short caption for this image.")
DEFAULT_SOURCES = ("emoji", "digits")


@dataclass
class AlignSettings:
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    sources: tuple[str, ...] = DEFAULT_SOURCES


def caption_examples(sources: Sequence[str]) -> list[tuple[object, str]]:
    """(image reference, caption) from the built-in training splits."""
    pairs = []
    for name in sources:
        for record in load_builtin(name, "train", "pairs").records:
            pairs.extend((record.image, caption) for caption in record.captions)
    return pairs


def align_projector(adapter: EmbeddedAdapter, settings: AlignSettings, out: Path,
                    log: Callable[[str], None] = print) -> dict:
    """Train the projector; write it to `out` (safetensors) and a JSON log beside it."""
    from safetensors.torch import save_file

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    pairs = caption_examples(settings.sources)
    model = adapter.model
    model.requires_grad_(False)
    parameters = adapter.trainable_parameters("projector")
    for parameter in parameters:
        parameter.requires_grad_(True)
    trainer = Trainer(parameters, settings.lr, total_steps=settings.steps,
                      warmup_steps=settings.warmup)
    model.train()
    # A stream of batches rather than epochs: a fresh permutation joins the queue
    # whenever fewer than a batch remain.
    history, started, order = [], time.monotonic(), []
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            order.extend(rng.sample(range(len(pairs)), len(pairs)))
        chosen = [pairs[order.pop()] for _ in range(settings.batch_size)]
        images = [to_float(load_image_uint8(ref, ref.key)) for ref, _ in chosen]
        examples = [TextExample(rng.choice(ALIGN_PROMPTS), caption) for _, caption in chosen]
        history.append(round(trainer.step(adapter.loss(images, examples).loss.mean()), 4))
        if (step + 1) % 20 == 0 or step == 0:
            recent = history[-20:]
            log(f"align {adapter.name}: step {step + 1}/{settings.steps} "
                f"loss {sum(recent) / len(recent):.3f} ({time.monotonic() - started:.0f} s)")
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter.projector_state(), str(out))
    out.chmod(0o644)  # safetensors writes owner-only files; weights are shipped and shared
    record = {"model": adapter.name, "settings": asdict(settings), "pairs": len(pairs),
              "loss": history, "seconds": round(time.monotonic() - started, 1)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record
