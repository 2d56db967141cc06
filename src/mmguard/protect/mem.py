"""MEM: multi-step error minimisation, noise + text trigger (Liu et al., ACM MM 2024)."""

from __future__ import annotations

from mmguard.protect.error_minimizing import ContrastiveErrorMinimizing


class MultiStepErrorMinimizing(ContrastiveErrorMinimizing):
    """min over (delta, trigger) of min over theta of InfoNCE(x + delta, trigger + caption).

    Each image gets its own noise and its own k-token trigger, placed before
    every caption of that image. Per round and batch: surrogate steps; a
    HotFlip trigger update (top-k candidates from the embedding gradient, exact
    batch loss, left-to-right beam search; only in the first `trigger_rounds`,
    default half of the rounds); PGD descent with the captions shuffled within
    the batch and each image's own trigger attached, so the noise binds to the
    trigger. Triggers start as "the the the"; `natural_triggers` restricts them
    to real English words (MEM section 4.4).

    Settings: trigger_len (3; MEM-3 / MEM-5), eps (8/255), step_size (1/255),
    pgd_steps (8), top_k (16), beam_width (1), rounds (10), trigger_rounds,
    stop_loss (0.01), natural_triggers (False), surrogates (["rn-tiny"]).

    Example:
        mmguard protect --dataset emoji --method mem --trigger-len 5 --out out/
    """

    name = "mem"
    summary = "MEM: noise + optimised text trigger (CLIP-style models)"
    uses = ContrastiveErrorMinimizing.uses | {"trigger_len", "natural_triggers", "top_k",
                                              "beam_width", "trigger_rounds", "trigger_vocab"}
    shuffle_captions = True
    trigger_len_default = 3
