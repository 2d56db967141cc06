"""MMGuard: coupled image noise + inserted text trigger against LVLM fine-tuning.

Zhao et al. 2026, "To See is Not to Learn". For (image, prompt, response)
data. Per round and batch, on one surrogate LVLM or an ensemble:

1. (with --bilevel) the surrogates' projectors take a step on the current
   protected batch;
2. the trigger (at most `trigger_len` tokens, *inserted* into the prompt at
   `trigger_position`, never replacing a word) is updated by HotFlip: top-k
   candidates per trigger position from the embedding gradient, then every
   candidate is decoded, inserted as text, re-tokenised, rejected unless it
   tokenises back to the same ids, and scored by the exact objective; the
   current trigger is always a candidate, so no item's objective rises;
3. the image noise takes PGD steps that *minimise* the objective through each
   surrogate's differentiable image processor.

The objective is the response-only training loss plus `binding_weight` times
the binding disruption loss (`--binding bph|crs|none`, see binding.py), so the
noise and trigger become a shortcut the fine-tuned model relies on instead of
the content. `--components image` / `text` are the paper's single-modality
ablations; `--binding none` the one without binding disruption. Beyond the
paper, `--trigger-groups response` and `--noise-groups response` share one
trigger, or one noise pattern, among all items with the same responses.

Settings: eps (8/255), trigger_len (3), trigger_position ("end"), binding
("bph"), binding_weight (0.5), rounds (3), pgd_steps (8), step_size (1/255),
top_k (8), surrogates (["smolvlm-lite"]), bilevel (off), natural_triggers.

Example:
    mmguard protect --dataset fashion-mnist --kind triples --method mmguard \\
        --surrogate smolvlm-lite --surrogate smolvlm-lite-b --out protected/
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import TRIGGER, TextExample
from mmguard.protect.base import (
    DatasetView,
    MethodSettings,
    ProtectedItem,
    ProtectionItem,
    ProtectionMethod,
)
from mmguard.protect.hotflip import beam_search, hotflip_candidates
from mmguard.protect.lvlm_surrogates import SurrogateEnsemble
from mmguard.protect.pgd import pgd, random_start
from mmguard.protect.seeding import item_generator
from mmguard.protect.state import PerturbationStore
from mmguard.protect.triggers import lvlm_trigger_vocabulary

INITIAL_TRIGGER_WORD = " the"
COMPONENTS = ("image+text", "image", "text")
GROUPS = ("item", "response")  # --trigger-groups / --noise-groups
CHECKPOINT = "surrogates.pt"
SCORE_CHUNK = 16  # candidate examples per no-grad forward
REJECTED = float("inf")


class MMGuard(ProtectionMethod):
    name = "mmguard"
    summary = "MMGuard: noise + inserted trigger + binding disruption (LLaVA-style LVLMs)"
    uses = frozenset({"device", "batch_size", "surrogates", "rounds", "pgd_steps", "step_size",
                      "trigger_len", "natural_triggers", "trigger_vocab", "top_k", "beam_width",
                      "trigger_rounds", "binding", "binding_weight", "components",
                      "trigger_position", "trigger_groups", "noise_groups", "bilevel",
                      "train_steps", "surrogate_lr"})
    kinds = ("triples",)
    defaults = {"rounds": 3, "top_k": 8, "batch_size": 8}

    def __init__(self, settings: MethodSettings):
        super().__init__(settings)
        if settings.components not in COMPONENTS:
            raise MMGuardError(f"--components {settings.components!r}: choose "
                               f"{', '.join(COMPONENTS)}")
        for option, value in (("--trigger-groups", settings.trigger_groups),
                              ("--noise-groups", settings.noise_groups)):
            if value not in GROUPS:
                raise MMGuardError(f"{option} {value!r}: choose {', '.join(GROUPS)}")
        position = settings.trigger_position
        self.trigger_position: str | int = position if position in ("start", "end") \
            else _word_index(position)

    @property
    def trigger_len(self) -> int:
        if self.settings.components == "image":
            return 0
        return 3 if self.settings.trigger_len is None else self.settings.trigger_len

    @property
    def perturbs_image(self) -> bool:
        return self.settings.components != "text"

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["surrogates"] = list(self.settings.surrogates) or ["smolvlm-lite"]
        described["trigger_len"] = self.trigger_len
        return described

    # -- whole-dataset optimisation ------------------------------------------
    def prepare(self, data: DatasetView, workdir: Path) -> None:
        settings = self.settings
        self.store = PerturbationStore(workdir)
        self.ensemble = SurrogateEnsemble(settings)
        saved = self.store.load_module(CHECKPOINT)
        if saved is not None:
            self.ensemble.load(saved)
        primary = self.ensemble.primary
        progress = self.store.read_json("progress.json", {"round": 0, "history": []})
        self.history: list[dict[str, Any]] = progress["history"]
        self.triggers: dict[str, list[int]] = self.store.read_json("triggers.json", {})
        if self.trigger_len:
            self.allowed = lvlm_trigger_vocabulary(
                primary.tokenizer, settings.natural_triggers, settings.trigger_vocab,
                settings.seed, primary.input_embeddings().num_embeddings)
            start = primary.tokenizer(INITIAL_TRIGGER_WORD, add_special_tokens=False)["input_ids"]
            self.start_trigger = start * self.trigger_len
        trigger_rounds = settings.trigger_rounds
        if trigger_rounds is None:
            trigger_rounds = settings.rounds
        for round_index in range(progress["round"], settings.rounds):
            started = time.monotonic()
            order = torch.randperm(len(data.keys), generator=torch.Generator().manual_seed(
                settings.seed * 1000 + round_index)).tolist()
            sums: dict[str, float] = {}
            batches = changed = 0
            starts = range(0, len(order), settings.batch_size)
            # Shown on terminals only (disable=None): rounds take minutes on a CPU.
            for start_index in tqdm(starts, desc=f"mmguard round {round_index + 1}/"
                                    f"{settings.rounds}", unit="batch", disable=None,
                                    leave=False):
                keys = [data.keys[i] for i in order[start_index:start_index + settings.batch_size]]
                items = data.load(keys)
                if not items:
                    continue
                parts, count = self._optimise_batch(
                    items, round_index, bool(self.trigger_len) and round_index < trigger_rounds)
                changed += count
                batches += 1
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value
            entry = {"round": round_index + 1, "trigger_changes": changed,
                     "seconds": round(time.monotonic() - started, 1)}
            entry.update({key: round(value / max(1, batches), 5) for key, value in sums.items()})
            self.history.append(entry)
            if settings.bilevel:
                self.store.save_module(CHECKPOINT, self.ensemble.state())
            self.store.write_json("triggers.json", self.triggers)
            self.store.write_json("progress.json", {"round": round_index + 1,
                                                    "history": self.history})

    def _examples(self, items: list[ProtectionItem], round_index: int) -> list[TextExample]:
        """One (prompt, response) per image for this round (a random one if it has several)."""
        examples = []
        for item in items:
            if not item.responses:
                raise MMGuardError(f"{item.key}: mmguard protects (image, prompt, response) "
                                   "triples; this item has no response (use --kind triples)")
            pick = random.Random(f"{self.settings.seed} {round_index} {item.key}").randrange(
                len(item.texts))
            trigger = None
            if self.trigger_len:
                trigger = self.ensemble.primary.decode_trigger(self._trigger_ids(item))
            examples.append(TextExample(item.texts[pick], item.responses[pick], trigger,
                                        self.trigger_position))
        return examples

    def _optimise_batch(self, items: list[ProtectionItem], round_index: int,
                        update_trigger: bool) -> tuple[dict[str, float], int]:
        settings, ensemble = self.settings, self.ensemble
        originals = [item.image for item in items]
        # One noise per item, or (--noise-groups response) one per group in this batch.
        noise_keys = list(dict.fromkeys(self._noise_key(item) for item in items))
        shared_by = [noise_keys.index(self._noise_key(item)) for item in items]
        owners = {key: items[shared_by.index(j)] for j, key in enumerate(noise_keys)}
        noises = [self._delta(owners[key]) for key in noise_keys]
        deltas = self._member_deltas(items, noises, shared_by)
        examples = self._examples(items, round_index)
        if settings.bilevel:
            for _ in range(max(1, settings.train_steps)):
                ensemble.train_step([x + d for x, d in zip(originals, deltas, strict=True)],
                                    examples)
        clean_profiles = ensemble.clean_profiles(originals, examples)
        changed = 0
        if update_trigger:
            perturbed = [x + d for x, d in zip(originals, deltas, strict=True)]
            examples, changed = self._update_triggers(items, perturbed, examples, clean_profiles)
        if self.perturbs_image:
            def loss_fn(images: list[torch.Tensor]) -> torch.Tensor:
                return ensemble.objective(images, examples, clean_profiles)[0].sum()

            shared = settings.noise_groups != "item"
            noises = pgd(originals, noises if shared else deltas, loss_fn, eps=settings.eps,
                         step_size=settings.step_size, steps=settings.pgd_steps,
                         shared_by=shared_by if shared else None)
            for key, noise in zip(noise_keys, noises, strict=True):
                self.store.save_delta(key, noise)
            deltas = self._member_deltas(items, noises, shared_by)
        with torch.no_grad():
            _, parts = ensemble.objective([x + d for x, d in zip(originals, deltas, strict=True)],
                                          examples, clean_profiles)
        return parts, changed

    def _delta(self, item: ProtectionItem) -> torch.Tensor:
        """The noise `item` carries so far (its own, or its group's); a seeded random
        start in the ball the first time.

        A zero start would leave CRS stuck: a divergence from the clean input
        has zero gradient at the clean input itself.
        """
        key = self._noise_key(item)
        if not self.perturbs_image or self.store.has_delta(key):
            return self.store.delta(key, item.image.shape)
        generator = item_generator(self.settings.seed, f"start {key}")
        return random_start([item.image], self.settings.eps, generator)[0]

    @staticmethod
    def _member_deltas(items: list[ProtectionItem], noises: list[torch.Tensor],
                       shared_by: list[int]) -> list[torch.Tensor]:
        """Each item's effective perturbation: its noise, cut so the image stays in [0, 1]."""
        deltas = []
        for item, j in zip(items, shared_by, strict=True):
            if noises[j].shape != item.image.shape:
                raise MMGuardError(f"{item.where}: --noise-groups shares one noise pattern per "
                                   f"group, but this image is {tuple(item.image.shape[1:])} and "
                                   f"its group's noise {tuple(noises[j].shape[1:])}; resize the "
                                   "images to one size or use --noise-groups item")
            deltas.append((item.image + noises[j]).clamp(0.0, 1.0) - item.image)
        return deltas

    # -- grouping ------------------------------------------------------------
    @staticmethod
    def _group_key(item: ProtectionItem, grouping: str) -> str:
        """The item itself, or ("response") every item with the same set of responses."""
        if grouping == "item":
            return item.key
        return "response: " + " | ".join(sorted({r.strip() for r in item.responses or []}))

    def _noise_key(self, item: ProtectionItem) -> str:
        return self._group_key(item, self.settings.noise_groups)

    # -- trigger search ------------------------------------------------------
    def _trigger_key(self, item: ProtectionItem) -> str:
        """Which trigger an item carries: its own (the paper), or, with
        `--trigger-groups response`, the one shared by every item with the same responses."""
        return self._group_key(item, self.settings.trigger_groups)

    def _trigger_ids(self, item: ProtectionItem) -> list[int]:
        return self.triggers.setdefault(self._trigger_key(item), list(self.start_trigger))

    def _update_triggers(self, items, perturbed, examples, clean_profiles):
        """HotFlip over the batch's trigger groups (one item each, unless --trigger-groups
        response): candidates from the members' summed gradients, each candidate scored by
        the members' summed exact objective and rejected if any member's re-tokenisation
        differs."""
        ensemble, primary = self.ensemble, self.ensemble.primary
        keys = [self._trigger_key(item) for item in items]
        for item in items:
            self._trigger_ids(item)
        groups = list(dict.fromkeys(keys))
        members = [[i for i, key in enumerate(keys) if key == group] for group in groups]
        current = torch.tensor([self.triggers[group] for group in groups], dtype=torch.long)
        grads = self._trigger_gradients(perturbed, examples, clean_profiles)
        grads = torch.stack([grads[rows].sum(dim=0) for rows in members])
        candidates = hotflip_candidates(grads, primary.input_embeddings().weight.detach().cpu(),
                                        self.allowed, self.settings.top_k)
        image_tokens = primary.pixel_inputs(perturbed[:1]).tokens_per_image[0]

        def score_items(owners: list[int], triggers: list[list[int]]) -> torch.Tensor:
            scores = torch.full((len(owners),), REJECTED)
            valid = []
            for row, (owner, ids) in enumerate(zip(owners, triggers, strict=True)):
                example = examples[owner]
                if primary.verify_trigger(example, ids, image_tokens):
                    text = primary.decode_trigger(ids)
                    valid.append((row, owner, TextExample(example.prompt, example.response,
                                                          text, example.trigger_position)))
            for start in range(0, len(valid), SCORE_CHUNK):
                chunk = valid[start:start + SCORE_CHUNK]
                owners_chunk = [owner for _, owner, _ in chunk]
                profiles = [None if p is None else p[owners_chunk] for p in clean_profiles]
                with torch.no_grad():
                    values, _ = ensemble.objective([perturbed[o] for o in owners_chunk],
                                                   [e for _, _, e in chunk], profiles)
                for (row, _, _), value in zip(chunk, values.cpu().tolist(), strict=True):
                    scores[row] = value
            return scores

        def score(group_rows: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
            rows, owners, expanded = [], [], []
            for row, (group, ids) in enumerate(zip(group_rows.tolist(), triggers.tolist(),
                                                   strict=True)):
                for owner in members[group]:
                    rows.append(row)
                    owners.append(owner)
                    expanded.append(ids)
            # A candidate rejected for one member scores inf for its group: inf + x = inf.
            return torch.zeros(len(group_rows)).index_add_(
                0, torch.tensor(rows), score_items(owners, expanded))

        updated, _ = beam_search(current, candidates, score, self.settings.beam_width)
        changed = 0
        for group, rows, new, old in zip(groups, members, updated.tolist(), current.tolist(),
                                         strict=True):
            self.triggers[group] = new
            changed += len(rows) * int(new != old)
        texts = [primary.decode_trigger(self.triggers[key]) for key in keys]
        examples = [TextExample(e.prompt, e.response, text, e.trigger_position)
                    for e, text in zip(examples, texts, strict=True)]
        return examples, changed

    def _trigger_gradients(self, perturbed, examples, clean_profiles) -> torch.Tensor:
        """(B, k, E) gradient of the objective w.r.t. each trigger token's embedding,
        summed over the members that share the primary's vocabulary."""
        total = None
        for index, member in enumerate(self.ensemble.members):
            if not self.ensemble.shares_vocabulary(member):
                continue
            pixels = member.pixel_inputs([image.detach() for image in perturbed])
            batch = member.encode(examples, pixels)
            with member.embedding_gradients() as holder:
                value, _ = self.ensemble.member_objective(index, perturbed, examples,
                                                          clean_profiles[index])
                (grad,) = torch.autograd.grad(value.sum(), holder["embeds"])
            mask = batch.roles.to(grad.device) == TRIGGER
            picked = grad[mask].reshape(len(examples), self.trigger_len, -1).cpu()
            total = picked if total is None else total + picked
        return total

    # -- output ---------------------------------------------------------------
    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        protected = []
        for item in batch:
            delta = self.store.delta(self._noise_key(item), item.image.shape)
            trigger = None
            if self.trigger_len:
                trigger = self.ensemble.primary.decode_trigger(self._trigger_ids(item))
            protected.append(ProtectedItem((item.image + delta).clamp(0.0, 1.0), trigger))
        return protected

    def report(self) -> dict[str, Any]:
        return {"surrogates": getattr(self, "ensemble", None) and self.ensemble.names,
                "rounds": getattr(self, "history", [])}


def _word_index(position: str) -> int:
    try:
        index = int(position)
    except ValueError:
        raise MMGuardError(f"--trigger-position {position!r}: use start, end or a word "
                           "index") from None
    if index < 0:
        raise MMGuardError("--trigger-position must not be negative")
    return index
