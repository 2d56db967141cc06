"""The contract every generative vision-language model (LVLM) adapter implements.

An adapter turns (images in [0, 1] at their stored size, prompts, responses,
optional text triggers) into what protection and attack need:

- `pixel_inputs(images)`: the model's own image processor as differentiable
  torch ops, so gradients reach the stored pixels;
- `encode(examples, pixels)`: the chat-templated token sequence with image
  placeholders expanded, right-padded, with the response-only labels and the
  role of every token (image, prompt, trigger, answer, template);
- `forward(batch, pixels)`: the next-token loss on response tokens only (one
  value per example) and, on request, the language model's attention maps
  averaged over layers and heads;
- `input_embeddings()`: the token-embedding matrix for HotFlip, and
  `embedding_gradients()`, a context that exposes the embedded input sequence
  as a leaf tensor so a backward pass yields d loss / d e_i at every position;
- `generate(images, prompts)`: greedy answers, for evaluation.

Token roles come from one tokenisation of the full text (with character
offsets), exactly as an attacker's data loader tokenises the released text, so
a trigger that tokenises differently inside its sentence is seen as it really is.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.data.trigger_text import trigger_segments
from mmguard.errors import MMGuardError

# Token roles. IMAGE marks the placeholder positions the image features fill.
TEMPLATE, IMAGE, PROMPT, TRIGGER, ANSWER, PAD = range(6)
ROLE_NAMES = {TEMPLATE: "template", IMAGE: "image", PROMPT: "prompt", TRIGGER: "trigger",
              ANSWER: "answer", PAD: "pad"}

Segment = tuple[str, int]  # (text, role)


@dataclass(frozen=True)
class TextExample:
    """One (prompt, response) with an optional trigger inserted into the prompt.

    `trigger_position` is "start", "end" or a word index, as in
    `mmguard.data.trigger_text.insert_trigger`; the released prompt is
    exactly `insert_trigger(prompt, trigger, trigger_position)`.
    `response=None` encodes the prompt only, ready for generation.
    """

    prompt: str
    response: str | None = None
    trigger: str | None = None
    trigger_position: str | int = "end"


@dataclass
class PixelInputs:
    """Model inputs computed from pixels (differentiable), and image tokens per image."""

    tensors: dict[str, torch.Tensor]
    tokens_per_image: list[int]


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 except response tokens (unshifted)
    roles: torch.Tensor  # (B, L) long, one of the role constants
    texts: list[str] = field(default_factory=list)  # the full templated texts

    def mask(self, role: int) -> torch.Tensor:
        return self.roles == role

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device),
                            self.labels.to(device), self.roles.to(device), self.texts)


@dataclass
class LVLMOutput:
    loss: torch.Tensor  # (B,) mean next-token loss over each example's response tokens
    attention: torch.Tensor | None = None  # (B, L, L) mean over layers and heads, rows = queries
    # With `attention_layers=n`: the first n layers' maps, each (B, L, L) averaged over heads.
    layer_attentions: list[torch.Tensor] | None = None


class LVLMAdapter(ABC):
    """Base class of every LVLM adapter (Hugging Face families and the embedded models).

    Subclasses set `model` (an nn.Module), `tokenizer` (a fast Hugging Face
    tokenizer) and `name`, and implement `pixel_inputs`, `template` and
    `_run`. Everything else (tokenising with roles, labels, losses, HotFlip
    gradients, trigger verification) is shared.
    """

    name: str
    model: nn.Module
    tokenizer: Any

    # -- what each model defines ---------------------------------------------
    @abstractmethod
    def pixel_inputs(self, images: Sequence[torch.Tensor]) -> PixelInputs:
        """The model's image processor on (3, H, W) images in [0, 1], differentiably."""

    @abstractmethod
    def template(self, prompt: list[Segment], image_tokens: int,
                 response: str | None) -> list[Segment]:
        """The full chat text as role-tagged pieces.

        `prompt` is the user's prompt, already split into PROMPT and TRIGGER
        pieces; the adapter adds its chat template (TEMPLATE), `image_tokens`
        image placeholder tokens (IMAGE) and, if given, the response (ANSWER)
        followed by the end-of-turn marker (ANSWER too, so the model learns to
        stop).
        """

    @abstractmethod
    def _run(self, batch: EncodedBatch, pixels: PixelInputs,
             output_attentions: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Logits (B, L, V) (may be computed only where labels are set: see
        `answer_logits`) and, if asked, per-layer attentions (B, heads, L, L)."""

    @abstractmethod
    def _generate_ids(self, batch: EncodedBatch, pixels: PixelInputs,
                      max_new_tokens: int) -> torch.Tensor:
        """Greedy generation from a left-padded prompt batch: the new token ids only,
        stopping at the end-of-turn token."""

    def generate(self, images: Sequence[torch.Tensor], examples: Sequence[TextExample],
                 max_new_tokens: int = 16) -> list[str]:
        """Greedy answers to the examples' prompts (responses ignored)."""
        prompts = [TextExample(e.prompt, None, e.trigger, e.trigger_position) for e in examples]
        pixels = self.pixel_inputs(images)
        batch = left_padded(self.encode(prompts, pixels)).to(self.device)
        answers = self._generate_ids(batch, pixels, max_new_tokens)
        return [text.strip() for text in self.tokenizer.batch_decode(answers,
                                                                     skip_special_tokens=True)]

    def trainable_parameters(self, recipe: str) -> list[nn.Parameter]:
        """Parameters an attacker trains: "projector" (the modality connector) or "full"."""
        if recipe == "full":
            return [p for p in self.model.parameters()]
        raise MMGuardError(f"{self.name} does not support the {recipe!r} recipe")

    def vision_features(self, pixels: PixelInputs) -> torch.Tensor:
        """(B, D) the frozen vision tower's output for each image, flattened: what an
        attacker who trains only the projector and the language model learns from."""
        raise MMGuardError(f"{self.name} does not expose its vision features yet")

    def image_token_change(self, clean: PixelInputs,
                           protected: PixelInputs) -> list[torch.Tensor]:
        """Per image, (T,) the mean |change| of the processed pixels each image token
        covers, in the order of the image tokens in the sequence (MMGuard's ρ, Eq 22)."""
        raise MMGuardError(f"{self.name} does not say which pixels its image tokens cover; "
                           "the exact BPH loss needs it")

    def lora_target_modules(self, include_mlp: bool = False) -> list[str]:
        """Module names (peft `target_modules`) of the language model's attention
        projections, and with `include_mlp` its MLP projections too."""
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
        return names + ["gate_proj", "up_proj", "down_proj"] if include_mlp else names

    # -- shared ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def encode(self, examples: Sequence[TextExample], pixels: PixelInputs) -> EncodedBatch:
        """Tokenise every example as one text, with roles from character offsets."""
        if len(examples) != len(pixels.tokens_per_image):
            raise ValueError("one image per example")
        rows = [self._encode_one(example, count)
                for example, count in zip(examples, pixels.tokens_per_image, strict=True)]
        length = max(len(ids) for ids, _, _ in rows)
        pad_id = self.pad_token_id
        batch = len(rows)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        roles = torch.full((batch, length), PAD, dtype=torch.long)
        texts = []
        for row, (ids, token_roles, text) in enumerate(rows):
            n = len(ids)
            input_ids[row, :n] = torch.tensor(ids)
            attention[row, :n] = 1
            roles[row, :n] = torch.tensor(token_roles)
            labels[row, :n] = torch.where(roles[row, :n] == ANSWER, input_ids[row, :n], -100)
            texts.append(text)
        return EncodedBatch(input_ids, attention, labels, roles, texts)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def _encode_one(self, example: TextExample,
                    image_tokens: int) -> tuple[list[int], list[int], str]:
        prompt = trigger_segments(example.prompt, example.trigger, example.trigger_position,
                                  PROMPT, TRIGGER)
        segments = [(text, role) for text, role in
                    self.template(prompt, image_tokens, example.response) if text]
        text = "".join(piece for piece, _ in segments)
        bounds, position = [], 0
        for piece, role in segments:
            bounds.append((position, position + len(piece), role))
            position += len(piece)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        roles = [_role_at(bounds, start, end, text) for start, end in encoded["offset_mapping"]]
        placeholders = sum(role == IMAGE for role in roles)
        if placeholders != image_tokens:
            raise MMGuardError(f"{self.name}: the template produced {placeholders} image tokens, "
                               f"the image needs {image_tokens}")
        return ids, roles, text

    def forward(self, batch: EncodedBatch, pixels: PixelInputs,
                output_attentions: bool = False,
                attention_layers: int | None = None) -> LVLMOutput:
        """The response loss and, with `output_attentions`, the attention maps: their
        mean over all layers, or with `attention_layers=n` the first n layers one by one
        (the only ones averaged over heads; MMGuard's binding reads the early layers)."""
        batch = batch.to(self.device)
        logits, attentions = self._run(batch, pixels, output_attentions)
        loss = response_loss(logits, batch.labels)
        if not output_attentions:
            return LVLMOutput(loss)
        if not attentions:
            raise MMGuardError(f"{self.name} returned no attention maps")
        if attention_layers is not None:
            return LVLMOutput(loss, layer_attentions=[a.float().mean(dim=1)
                                                      for a in attentions[:attention_layers]])
        attention = torch.stack([a.float().mean(dim=1) for a in attentions]).mean(dim=0)
        return LVLMOutput(loss, attention)

    def loss(self, images: Sequence[torch.Tensor], examples: Sequence[TextExample],
             output_attentions: bool = False) -> LVLMOutput:
        """Convenience: process, encode and run in one call."""
        pixels = self.pixel_inputs(images)
        return self.forward(self.encode(examples, pixels), pixels, output_attentions)

    @contextlib.contextmanager
    def embedding_gradients(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, `holder["embeds"]` is the (B, L, E) embedded input
        sequence of the last forward pass as a leaf tensor that requires grad."""
        holder: dict[str, torch.Tensor] = {}

        def hook(_module, _inputs, output):
            leaf = output.detach().requires_grad_(True)
            holder["embeds"] = leaf
            return leaf

        handle = self.input_embeddings().register_forward_hook(hook)
        try:
            yield holder
        finally:
            handle.remove()

    def trigger_token_ids(self, example: TextExample, image_tokens: int) -> list[int]:
        """The ids the attacker's tokeniser gives the trigger inside its prompt."""
        ids, roles, _ = self._encode_one(replace_response(example, None), image_tokens)
        return [i for i, r in zip(ids, roles, strict=True) if r == TRIGGER]

    def verify_trigger(self, example: TextExample, trigger_ids: Sequence[int],
                       image_tokens: int) -> bool:
        """True when decoding `trigger_ids`, inserting the text into the prompt and
        re-tokenising the whole sequence gives back exactly these ids there.

        Tokenisers merge and split across word boundaries, so a candidate the
        gradient proposes as ids may not survive being released as text.
        """
        text = self.decode_trigger(trigger_ids)
        if not text:
            return False
        found = self.trigger_token_ids(replace_trigger(example, text), image_tokens)
        return found == list(trigger_ids)

    def decode_trigger(self, trigger_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(trigger_ids), skip_special_tokens=False).strip()


def _role_at(bounds: list[tuple[int, int, int]], start: int, end: int, text: str) -> int:
    """The role of the piece holding a token's first non-space character
    (or its first character, for a whitespace-only token)."""
    first = start
    while first < end and text[first].isspace():
        first += 1
    if first == end:
        first = start
    for lo, hi, role in bounds:
        if lo <= first < hi:
            return role
    return TEMPLATE


def replace_trigger(example: TextExample, trigger: str | None) -> TextExample:
    return TextExample(example.prompt, example.response, trigger, example.trigger_position)


def replace_response(example: TextExample, response: str | None) -> TextExample:
    return TextExample(example.prompt, response, example.trigger, example.trigger_position)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy of predicting each response token from the one before.

    `logits` may be (B, L, V) or already restricted by `answer_logits`
    (a (N, V) tensor for the N label positions, in row-major order).
    """
    targets = labels[:, 1:]
    selected = targets != -100
    if logits.dim() == 3:
        logits = logits[:, :-1][selected]
    losses = F.cross_entropy(logits.float(), targets[selected], reduction="none")
    per_example = torch.zeros(labels.shape[0], device=losses.device, dtype=losses.dtype)
    per_example = per_example.index_add(0, selected.nonzero()[:, 0], losses)
    counts = selected.sum(dim=1).clamp(min=1)
    return per_example / counts


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) mask of the positions whose hidden state predicts a response token."""
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    return predicting


def left_padded(batch: EncodedBatch) -> EncodedBatch:
    """Move each row's padding to the left, as generation needs."""
    lengths = batch.attention_mask.sum(dim=1)
    width = batch.input_ids.shape[1]
    rows = [(width - int(n)) for n in lengths]
    def shift(t: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full_like(t, fill)
        for i, pad in enumerate(rows):
            out[i, pad:] = t[i, :width - pad]
        return out
    return EncodedBatch(shift(batch.input_ids, 0), shift(batch.attention_mask, 0),
                        shift(batch.labels, -100), shift(batch.roles, PAD), batch.texts)
