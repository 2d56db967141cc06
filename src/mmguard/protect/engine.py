"""The bilevel engine every surrogate-based method plugs into (EM, UAP, MEM, MMGuard).

    for each round, over the dataset in batches (shuffled per round by the seed):
        1. surrogate steps: the surrogate learns the current protected batch
           (the inner minimisation; none for a fixed surrogate);
        2. trigger step (rounds < trigger_rounds): HotFlip over each item's, or
           each trigger group's, trigger: candidates from the embedding
           gradient, exact losses, left-to-right beam search;
        3. noise step: PGD on each item's (or noise group's) perturbation,
           descending the loss (error-minimising) or ascending it (`maximize`).
    after every round: checkpoint surrogate, triggers and history; a killed run
    resumes from the last finished round. Optionally the surrogate first trains
    `pretrain_epochs` epochs on the clean data (UAP).

A method is a subclass that sets its `Config` and overrides the hooks below
(which texts an item is scored with, what PGD sees, grouping, defaults); it
never sees which surrogate family it runs against (`protect/surrogates`).
Memory follows the batch: noise and triggers live in the work folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from mmguard.errors import MMGuardError
from mmguard.protect.base import (
    DatasetView,
    MethodConfig,
    ProtectedItem,
    ProtectionItem,
    ProtectionMethod,
    cells_option,
    coarse_option,
    gray_noise_option,
    option,
)
from mmguard.protect.hotflip import beam_search, hotflip_candidates, update_triggers
from mmguard.protect.pgd import SCHEDULES, fit_noise, pgd
from mmguard.protect.robust import expectation_over, parse_robust
from mmguard.protect.seeding import item_generator
from mmguard.protect.state import PerturbationStore
from mmguard.protect.surrogates import (
    DEFAULT_SURROGATES,
    Surrogate,
    TextItem,
    create_surrogate,
    surrogate_family,
)

CHECKPOINT = "surrogate.pt"


@dataclass
class SurrogateConfig(MethodConfig):
    """Options of every method optimised against a surrogate."""

    surrogates: tuple[str, ...] = option(
        (), "Surrogate model name (see `mmguard models`); several for an ensemble (LVLMs) "
        "[contrastive data: rn-tiny; triples: smolvlm-lite].", cli="surrogate", multiple=True)
    device: str = option("cpu", "Torch device, e.g. cuda or cuda:1.")
    batch_size: int = option(16, "Images per optimisation batch.", min=2)
    surrogate_lr: float = option(1e-4, "Surrogate learning rate.")
    pgd_steps: int = option(8, "PGD steps per batch and round.", min=1)
    step_size: float = option(1 / 255, "PGD step size (the first step's under a decaying "
                              "schedule).", type="eps")
    step_schedule: str = option("constant", "PGD step sizes: constant, or cosine (falling "
                                "from step_size to a twentieth of it, so the noise settles "
                                "instead of oscillating by a whole step).",
                                choices=SCHEDULES)
    robust: str = option("", "Optimise the noise to survive these attacker transformations "
                         "(expectation over them in every PGD step): any of jpeg, grayscale, "
                         "resize, crop, blur, comma-separated.", type=str)
    robust_every: bool = option(False, "With robust: score every transformation (and none) in "
                                "each PGD step and average, instead of one drawn per step "
                                "(as many times the cost).", flag=True)
    # An attacker who trains the tower normalises each batch by its own statistics, which
    # can undo a move made under the running ones (findings §21).
    surrogate_bn: str = option("running", "BatchNorm statistics while optimising noise and "
                               "triggers: the surrogate's running ones, or each batch's own, "
                               "as an attacker trains.", choices=("running", "batch"))
    coarse: int = coarse_option()
    cells: int = cells_option()
    gray_noise: bool = gray_noise_option()


def clean_epochs_option(default: int) -> Any:
    """Epochs of surrogate training on the clean data before any noise (the engine's
    `pretrain_epochs`), shared by the methods that craft on a clean-trained model."""
    return option(default, "Epochs of surrogate training on the clean data before any "
                  "noise is made (a surrogate trained from scratch needs about as many as "
                  "the attacker; set --surrogate-lr to its rate).", min=0)


@dataclass
class BilevelConfig(SurrogateConfig):
    """Options of the error-minimising loop (surrogate trained along the way)."""

    rounds: int = option(10, "Outer rounds of bilevel optimisation.", min=1)
    train_steps: int = option(1, "Surrogate training steps per batch and round.", min=0)


@dataclass
class TriggerConfig:
    """Options of methods with a text trigger (mixed into a method's Config)."""

    trigger_len: int = option(3, "Text trigger length in tokens.", min=1, max=32)
    natural_triggers: bool = option(False, "Triggers of real English words only "
                                    "(MEM section 4.4).", flag=True)
    trigger_vocab: int | None = option(None, "Draw trigger words from a fixed random subset of "
                                       "this many words (mmguard extension).", type=int, min=1)
    top_k: int = option(16, "HotFlip candidates per trigger position.", min=1)
    beam_width: int = option(1, "Beam width of the trigger search.", min=1)
    trigger_rounds: int | None = option(None, "Update triggers only in the first N rounds "
                                        "(unset: mem half of the rounds, mmguard all).",
                                        type=int, min=0)


class BilevelMethod(ProtectionMethod):
    """Base class of the surrogate-based methods: the loop above, and its hooks."""

    Config: ClassVar[type[SurrogateConfig]] = BilevelConfig
    config: SurrogateConfig
    maximize: ClassVar[bool] = False  # ascend the loss (error-maximising) instead
    # The surrogate used when none is named, by data kind (default: DEFAULT_SURROGATES).
    default_surrogates: ClassVar[dict[str, tuple[str, ...]]] = {}
    shuffle_rounds: ClassVar[bool] = True  # a new batch order every round

    def __init__(self, config: MethodConfig | None = None, kind: str | None = None):
        super().__init__(config, kind)
        # Unknown or mismatched surrogate names fail here, before any output exists.
        self.surrogate_names = (tuple(self.config.surrogates)
                                or {**DEFAULT_SURROGATES, **self.default_surrogates}[self.kind])
        self.family = surrogate_family(self.surrogate_names, self.kind)
        self.history: list[dict[str, Any]] = []
        self.pretrain_losses: list[float] = []
        self.robust = parse_robust(self.config.robust)

    # -- hooks ---------------------------------------------------------------------
    def surrogate_options(self) -> dict[str, Any]:
        """Keyword arguments of the surrogate family's constructor, beyond names."""
        return {"lr": self.config.surrogate_lr}

    @property
    def rounds(self) -> int:
        return getattr(self.config, "rounds", 1)

    @property
    def surrogate_steps(self) -> int:
        """Surrogate training steps per batch and round."""
        return getattr(self.config, "train_steps", 0)

    @property
    def round_surrogate_steps(self) -> int:
        """Surrogate steps on protected batches at the start of each round, after which
        the surrogate stays fixed for the round (the MEM reference code's regime)."""
        return 0

    @property
    def pretrain_epochs(self) -> int:
        """Epochs of surrogate training on the clean data before the first round."""
        return 0

    @property
    def trigger_len(self) -> int:
        """Trigger tokens per item; 0 for no trigger."""
        return 0

    @property
    def trigger_rounds(self) -> int:
        """Triggers are updated in the first this many rounds."""
        return self.rounds

    @property
    def perturbs_image(self) -> bool:
        return True

    @property
    def stop_loss(self) -> float | None:
        """Stop once a round's mean training loss is below this."""
        return None

    @property
    def batch_statistics(self) -> bool:
        """Optimise with BatchNorm on batch statistics (as an attacker trains)."""
        return self.config.surrogate_bn == "batch"

    def texts(self, items: list[ProtectionItem], round_index: int,
              generator: torch.Generator) -> list[TextItem]:
        """The text each item is scored with this round (with its current trigger)."""
        return [self.text_item(item, self._pick_text(item, generator)) for item in items]

    def noise_texts(self, texts: list[TextItem], generator: torch.Generator) -> list[TextItem]:
        """The texts PGD scores the perturbed images with (default: their own)."""
        return texts

    def noise_loss(self, items: list[ProtectionItem], texts: list[TextItem], reference: Any,
                   generator: torch.Generator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """The loss PGD descends (or ascends) on this batch (default: the surrogate's
        loss with `noise_texts`, fixed for all steps)."""
        return self.surrogate.noise_loss(self.noise_texts(texts, generator), reference)

    def measure(self, items: list[ProtectionItem], images: list[torch.Tensor],
                texts: list[TextItem], reference: Any) -> dict[str, float]:
        """What the run record logs per batch (means per round; default: the
        surrogate's loss and its parts)."""
        return self.surrogate.measure(images, texts, reference)

    def before_rounds(self, data: DatasetView) -> None:  # noqa: B027 - optional hook
        """Dataset-level work after the surrogate is built, before the first round."""

    def before_round(self, data: DatasetView, round_index: int) -> None:  # noqa: B027
        """Work at the start of each round, after `round_surrogate_steps` (optional)."""

    def noise_key(self, item: ProtectionItem) -> str:
        """Items with one noise key share one perturbation."""
        return item.key

    def trigger_key(self, item: ProtectionItem) -> str:
        """Items with one trigger key share one trigger."""
        return item.key

    def initial_noise(self, item: ProtectionItem) -> torch.Tensor:
        """The perturbation an item starts from (default: none)."""
        return torch.zeros_like(item.image)

    def noise_center(self, item: ProtectionItem) -> torch.Tensor | None:
        """A fixed part of the item's (or its noise group's) perturbation that PGD moves
        around, within `noise_radius` of it (default: none, the ball around zero)."""
        return None

    @property
    def noise_radius(self) -> float:
        """How far PGD moves from `noise_center` (default: the whole budget); a method
        with a center keeps |center| + radius within eps."""
        return self.config.eps

    # -- shared pieces of the hooks ---------------------------------------------------
    def text_item(self, item: ProtectionItem, index: int) -> TextItem:
        response = item.responses[index] if item.responses else None
        trigger = tuple(self._trigger_ids(item)) if self.trigger_len else ()
        return TextItem(item.texts[index], response, trigger, self.trigger_position)

    @staticmethod
    def _pick_text(item: ProtectionItem, generator: torch.Generator) -> int:
        if len(item.texts) == 1:
            return 0
        return int(torch.randint(len(item.texts), (1,), generator=generator))

    def _trigger_ids(self, item: ProtectionItem) -> list[int]:
        key = self.trigger_key(item)
        if key not in self.triggers:
            self.triggers[key] = self.initial_trigger(key)
        return self.triggers[key]

    def initial_trigger(self, key: str) -> list[int]:
        """The trigger an item (or trigger group) starts from (default: the surrogate's
        "the the the")."""
        return list(self.start_trigger)

    # -- whole-dataset optimisation ------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "surrogates": list(self.surrogate_names)}

    def setup(self, workdir: Path) -> dict[str, Any]:
        """Build the surrogate and restore what `workdir` holds; returns the progress.

        `prepare` starts with it; tools that time single batches call it alone.
        """
        config = self.config
        self.device = torch.device(config.device)
        self.store = PerturbationStore(workdir)
        self.surrogate: Surrogate = create_surrogate(
            self.surrogate_names, device=config.device, seed=config.seed,
            **self.surrogate_options())
        saved = self.store.load_module(CHECKPOINT)
        if saved is not None:
            self.surrogate.load(saved)
        progress = self.store.read_json("progress.json", {"round": 0, "history": [],
                                                          "pretrain_losses": []})
        self.history = progress["history"]
        self.pretrain_losses = progress["pretrain_losses"]
        self.triggers: dict[str, list[int]] = self.store.read_json("triggers.json", {})
        if self.trigger_len:
            self.allowed = self.surrogate.trigger_vocabulary(
                config.natural_triggers, config.trigger_vocab, config.seed)
            self.start_trigger = self.surrogate.initial_trigger(self.trigger_len)
        self._noise_stats = {"sum_abs": 0.0, "at_bound": 0, "count": 0}
        return progress

    def prepare(self, data: DatasetView, workdir: Path) -> None:
        progress = self.setup(workdir)
        for epoch in range(len(self.pretrain_losses), self.pretrain_epochs):
            losses = [self.surrogate.train_step([item.image for item in items],
                                                self.texts(items, -1, torch.Generator()))
                      for items in self._batches(data, epoch)]
            self.pretrain_losses.append(round(sum(losses) / max(1, len(losses)), 5))
            self._checkpoint(progress)
        self.before_rounds(data)
        for round_index in range(progress["round"], self.rounds):
            last = self.history[-1] if self.history else None
            if last and self.stop_loss is not None and last["train_loss"] < self.stop_loss:
                break
            self.history.append(self._round(data, round_index))
            progress["round"] = round_index + 1
            self._checkpoint(progress)

    def _checkpoint(self, progress: dict[str, Any]) -> None:
        if self.surrogate.trainable_parameters():
            self.store.save_module(CHECKPOINT, self.surrogate.state())
        self.store.write_json("triggers.json", self.triggers)
        self.store.write_json("progress.json", {**progress, "history": self.history,
                                                "pretrain_losses": self.pretrain_losses})

    def _batches(self, data: DatasetView, epoch: int | None):
        """The dataset in batches; shuffled by (seed, epoch) unless `epoch` is None."""
        order = list(range(len(data.keys)))
        if epoch is not None:
            generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        # A contrastive loss needs negatives: such a surrogate skips single-item batches.
        smallest = 2 if self.surrogate.items_interact else 1
        size = self.batch_size
        starts = range(0, len(order), size)
        # Shown on terminals only (disable=None): rounds take minutes on a CPU.
        for start in tqdm(starts, desc=f"{self.name} epoch {epoch}", unit="batch",
                          disable=None, leave=False):
            items = data.load([data.keys[i] for i in order[start:start + size]])
            if len(items) >= smallest:
                yield items

    def _round(self, data: DatasetView, round_index: int) -> dict[str, Any]:
        started = time.monotonic()
        sums: dict[str, float] = {}
        batches = changed = 0
        self._noise_stats = {"sum_abs": 0.0, "at_bound": 0, "count": 0}
        update_trigger = bool(self.trigger_len) and round_index < self.trigger_rounds
        if self.round_surrogate_steps:
            self._train_on_protected(data, round_index, self.round_surrogate_steps)
        self.before_round(data, round_index)
        for items in self._batches(data, round_index if self.shuffle_rounds else None):
            parts, count = self._optimise_batch(items, round_index, update_trigger)
            changed += count
            batches += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
        self.surrogate.end_round()
        stats = self._noise_stats
        count = max(1, stats["count"])
        entry: dict[str, Any] = {"round": round_index + 1}
        entry.update({key: round(value / max(1, batches), 5) for key, value in sums.items()})
        entry.update({"trigger_changes": changed,
                      "mean_abs_delta_levels": round(255 * stats["sum_abs"] / count, 3),
                      "share_at_bound": round(stats["at_bound"] / count, 4),
                      "seconds": round(time.monotonic() - started, 1)})
        return entry

    def _optimise_batch(self, items: list[ProtectionItem], round_index: int,
                        update_trigger: bool) -> tuple[dict[str, float], int]:
        config, surrogate = self.config, self.surrogate
        originals = [item.image.to(self.device) for item in items]
        # One noise per item, or one per noise group of this batch.
        noise_keys = list(dict.fromkeys(self.noise_key(item) for item in items))
        shared_by = [noise_keys.index(self.noise_key(item)) for item in items]
        shared = any(self.noise_key(item) != item.key for item in items)
        owners = {key: items[shared_by.index(j)] for j, key in enumerate(noise_keys)}
        noises = [self._noise(owners[key]) for key in noise_keys]
        deltas = _member_deltas(items, originals, noises, shared_by, self.config.cells)
        generator = item_generator(config.seed, f"round {round_index} {items[0].key}")
        texts = self.texts(items, round_index, generator)
        # (1) the surrogate learns the current protected batch
        perturbed = [x + d for x, d in zip(originals, deltas, strict=True)]
        for _ in range(self.surrogate_steps):
            surrogate.train_step(perturbed, texts)
        surrogate.adapt(perturbed, texts)
        reference = surrogate.reference(originals, texts)
        changed = 0
        with surrogate.perturbation_mode(self.batch_statistics):
            # (2) triggers, with the images fixed
            if update_trigger:
                texts, changed = self._trigger_step(items, perturbed, texts, reference)
            # (3) noise, with the texts fixed
            if self.perturbs_image:
                loss_fn = self.noise_loss(items, texts, reference, generator)
                if self.robust:
                    loss_fn = expectation_over(self.robust, loss_fn, generator,
                                               every=config.robust_every)
                centers = [self.noise_center(owners[key]) for key in noise_keys]
                noises = pgd(originals, noises if shared else deltas, loss_fn,
                             eps=self.noise_radius, step_size=config.step_size,
                             steps=config.pgd_steps, maximize=self.maximize,
                             shared_by=shared_by if shared else None,
                             coarse=config.coarse, gray=config.gray_noise,
                             cells=config.cells,
                             schedule=config.step_schedule,
                             centers=None if centers[0] is None
                             else [c.to(self.device) for c in centers])
                for key, noise in zip(noise_keys, noises, strict=True):
                    self.store.save_delta(key, noise)
                deltas = _member_deltas(items, originals, noises, shared_by, self.config.cells)
        bound = config.eps - 0.5 / 255  # within half a level of the budget
        for delta in deltas:
            self._noise_stats["sum_abs"] += float(delta.abs().sum())
            self._noise_stats["at_bound"] += int((delta.abs() >= bound).sum())
            self._noise_stats["count"] += delta.numel()
        parts = self.measure(items, [x + d for x, d in zip(originals, deltas, strict=True)],
                             texts, reference)
        return parts, changed

    def _train_on_protected(self, data: DatasetView, round_index: int, wanted: int) -> None:
        """`wanted` surrogate steps on the current protected data, in batches of a
        fresh seeded order (repeated if the data is shorter than the steps)."""
        steps, epoch = 0, 0
        while steps < wanted:
            # Orders of their own, apart from the rounds' (seed * 1000 + round).
            order_seed = 10_000_000 + 1000 * round_index + epoch
            for items in self._batches(data, order_seed):
                originals = [item.image.to(self.device) for item in items]
                noises = [self._noise(item) for item in items]
                deltas = _member_deltas(items, originals, noises, list(range(len(items))),
                                        self.config.cells)
                generator = item_generator(self.config.seed, f"train {order_seed} {items[0].key}")
                self.surrogate.train_step([x + d for x, d in zip(originals, deltas, strict=True)],
                                          self.texts(items, round_index, generator))
                steps += 1
                if steps == wanted:
                    return
            epoch += 1

    def _noise(self, item: ProtectionItem) -> torch.Tensor:
        """The noise `item` (or its group) carries so far, else its start."""
        key = self.noise_key(item)
        if not self.perturbs_image or self.store.has_delta(key):
            return self.store.delta(key, item.image.shape).to(self.device)
        return self.initial_noise(item).to(self.device)

    def _trigger_step(self, items: list[ProtectionItem], perturbed: list[torch.Tensor],
                      texts: list[TextItem], reference: Any) -> tuple[list[TextItem], int]:
        """HotFlip over the batch's trigger groups (one item each unless items share a
        trigger): candidates from the members' summed gradients, each candidate scored
        by the members' summed exact loss (inf when any member rejects it)."""
        config, surrogate = self.config, self.surrogate
        keys = [self.trigger_key(item) for item in items]
        groups = list(dict.fromkeys(keys))
        members = [[i for i, key in enumerate(keys) if key == group] for group in groups]
        current = torch.tensor([self.triggers[group] for group in groups], dtype=torch.long)
        search = surrogate.trigger_search(perturbed, texts, reference)
        grads = search.gradients().cpu()
        grads = torch.stack([grads[rows].sum(dim=0) for rows in members])
        candidates = hotflip_candidates(grads, surrogate.embedding_matrix().cpu(),
                                        self.allowed, config.top_k)

        def score(group_rows: torch.Tensor, triggers: torch.Tensor) -> torch.Tensor:
            rows, owners, expanded = [], [], []
            for row, (group, ids) in enumerate(zip(group_rows.tolist(), triggers.tolist(),
                                                   strict=True)):
                for owner in members[group]:
                    rows.append(row)
                    owners.append(owner)
                    expanded.append(ids)
            values = search.score(torch.tensor(owners), torch.tensor(expanded, dtype=torch.long))
            # A candidate rejected for one member scores inf for its group: inf + x = inf.
            return torch.zeros(len(group_rows)).index_add_(0, torch.tensor(rows), values)

        def joint(group_triggers: torch.Tensor) -> float:
            per_item = torch.empty(len(items), group_triggers.shape[1], dtype=torch.long)
            for rows, trigger in zip(members, group_triggers, strict=True):
                per_item[rows] = trigger
            return search.joint(per_item)

        if surrogate.items_interact:
            # Items share one loss: keep a joint update only if it does not raise it.
            updated, _, _ = update_triggers(current, candidates, score, joint,
                                            config.beam_width)
        else:
            updated, _ = beam_search(current, candidates, score, config.beam_width)
        changed = 0
        for group, rows, new, old in zip(groups, members, updated.tolist(), current.tolist(),
                                         strict=True):
            self.triggers[group] = new
            changed += len(rows) * int(new != old)
        return [text.with_trigger(self.triggers[key])
                for text, key in zip(texts, keys, strict=True)], changed

    # -- output ----------------------------------------------------------------------
    def released_noise(self, item: ProtectionItem, delta: torch.Tensor) -> torch.Tensor:
        """The noise `item` is released with, from its optimised `delta` (hook; the
        writer clips the image to [0, 1] and the budget)."""
        return delta

    def protect_batch(self, batch: list[ProtectionItem]) -> list[ProtectedItem]:
        protected = []
        for item in batch:
            stored = self.store.delta(self.noise_key(item), item.image.shape)
            delta = self.released_noise(item, fit_noise(stored, item.image.shape,
                                                        self.config.cells))
            trigger = None
            if self.trigger_len:
                trigger = self.surrogate.decode_trigger(self._trigger_ids(item))
            protected.append(ProtectedItem((item.image + delta).clamp(0.0, 1.0), trigger))
        return protected

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"surrogates": list(self.surrogate_names),
                                  "rounds": self.history}
        if self.pretrain_epochs:
            report["clean_epoch_losses"] = self.pretrain_losses
        return report


def _member_deltas(items: Sequence[ProtectionItem], originals: Sequence[torch.Tensor],
                   noises: Sequence[torch.Tensor], shared_by: Sequence[int],
                   cells: int = 0) -> list[torch.Tensor]:
    """Each item's effective perturbation: its (group's) noise, stretched to the item's
    size if the noise is on a fixed grid of `cells`, cut so the image stays in [0, 1]
    (noise shared by several images, and noise stored as float16, can leave it)."""
    deltas = []
    for item, x, j in zip(items, originals, shared_by, strict=True):
        if noises[j].shape != x.shape and not cells:
            raise MMGuardError(f"{item.key}: one noise pattern is shared per group, but this "
                               f"image is {tuple(x.shape[1:])} and its group's noise "
                               f"{tuple(noises[j].shape[1:])}; resize the images to one size, "
                               "give the noise a fixed grid (--cells N) or use --noise-groups "
                               "item")
        deltas.append((x + fit_noise(noises[j], x.shape, cells)).clamp(0.0, 1.0) - x)
    return deltas


def half_of(rounds: int) -> int:
    """MEM's default trigger schedule: the first half of the rounds (at least one)."""
    return max(1, math.ceil(rounds / 2))
