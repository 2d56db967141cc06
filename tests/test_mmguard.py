"""MMGuard and the embedded LVLM adapter, on the tiny random `lvlm-test` model."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmguard.data.builtin import load_builtin
from mmguard.data.images import load_image_uint8, to_float
from mmguard.data.sources import read_dataset
from mmguard.models.lvlm.attention import GROUP_NAMES, key_group_mass
from mmguard.models.lvlm.base import (
    ANSWER,
    IMAGE,
    PAD,
    PROMPT,
    TRIGGER,
    TextExample,
    answer_positions,
)
from mmguard.protect.binding import bph_loss, js_divergence, routing_profile
from mmguard.protect.pgd import pgd, random_start
from mmguard.protect.registry import create_method
from mmguard.protect.run import protect_dataset
from tests.conftest import BIN

PROMPT_TEXT = "What kind of clothing is this?"
# `adapter` (the tiny random lvlm-test) and `real_images` (4 emoji) come from conftest.py.


def _tokens(adapter, ids):
    return adapter.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_roles_by_construction_on_a_known_prompt(adapter, real_images):
    example = TextExample(PROMPT_TEXT, "a sneaker", "alpha beta", "end")
    pixels = adapter.pixel_inputs(real_images[:1])
    batch = adapter.encode([example], pixels)
    ids, roles = batch.input_ids[0], batch.roles[0]
    decode = adapter.tokenizer.decode
    assert int((roles == IMAGE).sum()) == pixels.tokens_per_image[0] == 4
    assert decode(ids[roles == PROMPT]) == PROMPT_TEXT
    assert decode(ids[roles == TRIGGER]) == " alpha beta"
    assert decode(ids[roles == ANSWER]) == "a sneaker<|im_end|>"
    # labels are the answer tokens and nothing else
    assert torch.equal(batch.labels[0] != -100, roles == ANSWER)


def test_trigger_insertion_keeps_every_prompt_token(adapter, real_images):
    pixels = adapter.pixel_inputs(real_images[:1])
    plain = adapter.encode([TextExample(PROMPT_TEXT, "shirt")], pixels)
    original = plain.input_ids[0][plain.roles[0] != PAD]
    for position in ("end", 2, 4):  # after a word: the very same token ids remain
        inserted = adapter.encode([TextExample(PROMPT_TEXT, "shirt", "zebra", position)], pixels)
        roles = inserted.roles[0]
        assert torch.equal(inserted.input_ids[0][(roles != TRIGGER) & (roles != PAD)], original)
        assert int((roles == TRIGGER).sum()) >= 1
    # at the start, the first word gains a leading space (a BPE token of its own) but
    # every word stays, in order
    inserted = adapter.encode([TextExample(PROMPT_TEXT, "shirt", "zebra", "start")], pixels)
    roles = inserted.roles[0]
    kept = adapter.tokenizer.decode(inserted.input_ids[0][roles == PROMPT])
    assert kept.split() == PROMPT_TEXT.split()


def test_loss_counts_response_tokens_only(adapter, real_images):
    pixels = adapter.pixel_inputs(real_images[:2])
    examples = [TextExample(PROMPT_TEXT, "a sneaker"), TextExample("Name it.", "a bag", "zebra")]
    batch = adapter.encode(examples, pixels)
    loss = adapter.forward(batch, pixels).loss
    # the same loss from full logits, by hand
    embeds = adapter._embed(batch, pixels)
    full = adapter.model.language_model(inputs_embeds=embeds,
                                        attention_mask=batch.attention_mask).logits
    for row in range(2):
        positions = (batch.roles[row] == ANSWER).nonzero()[:, 0]
        manual = F.cross_entropy(full[row, positions - 1], batch.input_ids[row, positions])
        assert loss[row].item() == pytest.approx(manual.item(), rel=1e-4)
    # a different prompt changes the input, not which tokens are scored
    other = adapter.encode([TextExample("Something else entirely?", "a sneaker")],
                           adapter.pixel_inputs(real_images[:1]))
    assert int((other.labels != -100).sum()) == int((batch.labels[0] != -100).sum())


def test_gradients_reach_the_stored_pixels(adapter, real_images):
    image = real_images[0].clone().requires_grad_(True)
    loss = adapter.loss([image], [TextExample(PROMPT_TEXT, "a sneaker")]).loss.sum()
    (grad,) = torch.autograd.grad(loss, image)
    assert grad.shape == image.shape and grad.abs().sum() > 0


def test_processor_matches_the_pillow_reference(adapter):
    from PIL import Image

    records = load_builtin("emoji", "test", "triples").records[:3]
    images = [r.image.opener().convert("RGB") for r in records]
    images.append(images[0].resize((50, 70)))
    for image in images:
        tensor = to_float(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        ours = adapter.pixel_inputs([tensor]).tensors["pixel_values"][0]
        reference = adapter.reference_pixels(Image.fromarray(
            (tensor.permute(1, 2, 0) * 255).round().byte().numpy()))
        assert (ours - reference).abs().max().item() <= 1e-2


def test_verify_trigger_rejects_ids_that_retokenize_differently(adapter):
    example = TextExample(PROMPT_TEXT, "shirt", None, "end")
    tokenizer = adapter.tokenizer
    clean = tokenizer(" zebra crossing", add_special_tokens=False)["input_ids"]
    assert adapter.verify_trigger(example, clean, 4)
    # " ze" + "bra": decodes to " zebra", which tokenizes as one token
    split = tokenizer(" ze", add_special_tokens=False)["input_ids"] + \
        tokenizer("bra", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(split) == " zebra" and split != tokenizer(
        " zebra", add_special_tokens=False)["input_ids"]
    assert not adapter.verify_trigger(example, split, 4)


def _answer_bridge_share(adapter, images, examples):
    pixels = adapter.pixel_inputs(images)
    batch = adapter.encode(examples, pixels)
    attention = adapter.forward(batch, pixels, output_attentions=True).attention
    answers = answer_positions(batch.labels)
    mass = key_group_mass(attention, batch.roles)
    bridge = mass[..., GROUP_NAMES.index("image")] + mass[..., GROUP_NAMES.index("trigger")]
    prompt = mass[..., GROUP_NAMES.index("prompt")]
    share = bridge / (bridge + prompt)
    return float(share[answers].mean().detach()), batch, attention


def test_bph_moves_answer_attention_onto_the_bridge(adapter, real_images):
    examples = [TextExample(PROMPT_TEXT, "a sneaker", "zebra crossing") for _ in real_images]
    before, _, _ = _answer_bridge_share(adapter, real_images, examples)

    def loss_fn(images):
        pixels = adapter.pixel_inputs(images)
        batch = adapter.encode(examples, pixels)
        attention = adapter.forward(batch, pixels, output_attentions=True).attention
        return bph_loss(attention, batch).sum()

    deltas = pgd(real_images, [torch.zeros_like(x) for x in real_images], loss_fn,
                 eps=16 / 255, step_size=2 / 255, steps=8)
    after, _, _ = _answer_bridge_share(
        adapter, [x + d for x, d in zip(real_images, deltas, strict=True)], examples)
    assert after > before


def test_crs_moves_answer_attention_away_from_the_clean_profile(adapter, real_images):
    examples = [TextExample(PROMPT_TEXT, "a sneaker") for _ in real_images]
    pixels = adapter.pixel_inputs(real_images)
    batch = adapter.encode(examples, pixels)
    with torch.no_grad():
        clean = routing_profile(adapter.forward(batch, pixels, True).attention, batch)

    def divergence(images):
        p = adapter.pixel_inputs(images)
        b = adapter.encode(examples, p)
        return js_divergence(routing_profile(adapter.forward(b, p, True).attention, b), clean)

    # From a random start, as MMGuard does: at the clean input itself the divergence
    # is at its minimum and has no gradient.
    start = random_start(real_images, 8 / 255, torch.Generator().manual_seed(0))
    with torch.no_grad():
        initial = divergence([x + d for x, d in zip(real_images, start, strict=True)])
    deltas = pgd(real_images, start, lambda images: -divergence(images).sum(), eps=8 / 255,
                 step_size=1 / 255, steps=8)
    with torch.no_grad():
        moved = divergence([x + d for x, d in zip(real_images, deltas, strict=True)])
    assert float(moved.mean()) > 2 * float(initial.mean())


# The error-minimising setting with the simplified BPH (mmguard's defaults before they became
# the paper's): the paper's losses and -Max have their own tests (test_binding_exact.py).
SIMPLIFIED = {"trigger_len": 3, "binding": "bph", "binding_weight": 0.5, "objective": "min",
              "inner_steps": 0}


def _protect(tmp_path, limit=4, **options):
    dataset = load_builtin("digits", "train", "triples")
    method = create_method("mmguard", "triples", eps=8 / 255, seed=0, surrogates=("lvlm-test",),
                           rounds=2, pgd_steps=2, top_k=3, batch_size=4,
                           **{**SIMPLIFIED, **options})
    out = tmp_path / "out"
    protect_dataset(dataset, method, out, limit=limit, progress=False)
    return method, out


def test_mmguard_writes_inserted_triggers_within_budget_and_lowers_the_objective(tmp_path):
    method, out = _protect(tmp_path)
    protected = read_dataset(out / "manifest.csv")
    originals = {r.image.key.split("/")[-1]: r for r in
                 load_builtin("digits", "train", "triples").records[:4]}
    tokenizer = method.surrogate.primary.tokenizer
    for record in protected.records:
        source = originals[record.image.key.split("/")[-1]]
        assert record.prompt.startswith(source.prompt + " ")
        trigger = record.prompt[len(source.prompt):]
        assert 1 <= len(tokenizer(trigger, add_special_tokens=False)["input_ids"]) <= 3
        assert record.response == source.response
    run = json.loads((out / "mmguard-run.json").read_text())
    assert max(item["linf_levels"] for item in run["items"]) <= 8
    rounds = run["optimisation"]["rounds"]
    assert rounds[-1]["train_loss"] + 0.5 * rounds[-1]["binding_loss"] < \
        rounds[0]["train_loss"] + 0.5 * rounds[0]["binding_loss"]


def test_mmguard_ablations_change_what_is_released(tmp_path):
    _, image_only = _protect(tmp_path / "a", components="image", binding="none")
    prompts = [r.prompt for r in read_dataset(image_only / "manifest.csv").records]
    assert all(p == "Which digit is written in this image?" for p in prompts)
    _, text_only = _protect(tmp_path / "b", components="text", binding="crs")
    run = json.loads((text_only / "mmguard-run.json").read_text())
    assert max(item["linf_levels"] for item in run["items"]) == 0
    assert all(item["trigger"] for item in run["items"])


def test_response_groups_share_one_searched_trigger(tmp_path):
    # Some answers occur more than once among the first 12 digits (in different batches of 4).
    method, out = _protect(tmp_path, limit=12, trigger_groups="response")
    records = read_dataset(out / "manifest.csv").records
    prompt = "Which digit is written in this image?"
    trigger_of: dict[str, set[str]] = {}
    for record in records:
        trigger_of.setdefault(record.response, set()).add(record.prompt[len(prompt):])
    assert len(records) == 12 and len(trigger_of) < 12
    assert all(len(triggers) == 1 for triggers in trigger_of.values()), trigger_of
    start = method.surrogate.primary.decode_trigger(method.start_trigger)
    assert any(triggers != {" " + start} for triggers in trigger_of.values())
    assert set(method.triggers) == {f"response: {answer}" for answer in trigger_of}


def test_response_noise_groups_share_one_noise_pattern(tmp_path):
    """Images with the same answer carry one noise pattern: wherever neither image clips at
    0 or 255, their saved changes are identical; images with other answers differ."""
    _, out = _protect(tmp_path, limit=12, noise_groups="response", components="image")
    originals = {r.image.key.split("/")[-1]: r for r in
                 load_builtin("digits", "train", "triples").records[:12]}
    changes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for record in read_dataset(out / "manifest.csv").records:
        source = originals[record.image.key.split("/")[-1]]
        before = load_image_uint8(source.image, source.where).int()
        after = load_image_uint8(record.image, record.where).int()
        assert (after - before).abs().max() <= 8
        changes.setdefault(record.response, []).append((after - before, after))
    shared = [group for group in changes.values() if len(group) > 1]
    assert shared and len(changes) < 12
    compared = 0
    for (change_a, after_a), (change_b, after_b) in (group[:2] for group in shared):
        inside = (after_a > 0) & (after_a < 255) & (after_b > 0) & (after_b < 255)
        assert torch.equal(change_a[inside], change_b[inside])
        compared += int(inside.sum())
    assert compared > 0
    (change_a, after_a), (change_b, after_b) = (group[0] for group in list(changes.values())[:2])
    inside = (after_a > 0) & (after_a < 255) & (after_b > 0) & (after_b < 255)
    assert not torch.equal(change_a[inside], change_b[inside])
    saved = list((out / ".mmguard" / "work" / "deltas").glob("*.npy"))
    assert len(saved) == len(changes)


def test_mmguard_refuses_pairs(tmp_path):
    result = subprocess.run([BIN / "mmguard", "protect", "--dataset", "digits", "--kind", "pairs",
                             "--method", "mmguard", "--out", str(tmp_path / "o"), "--limit", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "protects triples" in result.stderr


def test_align_trains_only_the_projector_and_round_trips_through_safetensors(tmp_path):
    from mmguard.models.lvlm.align import AlignSettings, align_projector
    from mmguard.models.lvlm.embedded import create_embedded

    adapter = create_embedded("lvlm-test", aligned=False)
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    out = tmp_path / "projector.safetensors"
    record = align_projector(adapter, AlignSettings(steps=3, batch_size=2, lr=1e-2, warmup=1,
                                                    sources=("digits",)), out, log=lambda _: None)
    assert len(record["loss"]) == 3 and out.with_suffix(".json").exists()
    changed = {name for name, p in adapter.model.named_parameters()
               if not torch.equal(p.detach(), before[name])}
    assert changed and all(name.startswith("projector.") for name in changed)
    reloaded = create_embedded("lvlm-test", projector=out)
    for name, value in adapter.projector_state().items():
        assert torch.equal(reloaded.projector_state()[name], value)


def test_method_defaults_come_from_its_own_config():
    # options given are kept; the rest take mmguard's own defaults, not another method's
    method = create_method("mmguard", "triples", top_k=4)
    assert (method.config.rounds, method.config.top_k, method.config.batch_size) == (3, 4, 8)
    mem = create_method("mem", "pairs")
    assert (mem.config.rounds, mem.config.top_k, mem.trigger_rounds) == (10, 16, 5)
    assert create_method("mmguard", "triples").trigger_rounds == 3


def test_mmguard_defaults_are_the_paper_row_the_fidelity_benchmark_measured():
    # `--method mmguard` without options is the paper's method as benchmarks/fidelity.py
    # measured it (its effort aside), so the published figures describe the default.
    from benchmarks.fidelity import EFFORT, PAPER

    config = create_method("mmguard", "triples").config
    for name, value in PAPER.items():
        if name not in EFFORT:
            assert getattr(config, name) == value, name
    assert create_method("mem", "pairs").config.trigger_len == 3  # MEM-3 keeps its own
