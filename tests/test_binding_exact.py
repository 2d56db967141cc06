"""MMGuard's binding losses as the paper defines them (Eqs 21-29), and -Max (Eq 32)."""

from __future__ import annotations

import math

import pytest
import torch

from mmguard.data.builtin import load_builtin
from mmguard.models.lvlm.base import ANSWER, IMAGE, PROMPT, TRIGGER, EncodedBatch, TextExample
from mmguard.models.lvlm.embedded import create_embedded
from mmguard.models.lvlm.registry import create_lvlm
from mmguard.protect.binding import (
    align_to_protected,
    answer_rows,
    attention_mass_loss,
    bph_exact_loss,
    crs_kl_loss,
    perturbation_tokens,
)
from mmguard.protect.pgd import pgd, random_start
from mmguard.protect.surrogates import TextItem
from mmguard.protect.surrogates.lvlm import LVLMSurrogate

PROMPT_TEXT = "What kind of clothing is this?"
# `adapter` (the tiny random lvlm-test) and `real_images` (4 emoji) come from conftest.py.


def test_attention_mass_of_a_hand_built_map_equals_the_hand_computed_kl():
    # one example, 4 keys; queries are rows 2 and 3; R = keys {0, 1}
    layer_a = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0],
                             [0.2, 0.3, 0.5, 0.0], [0.4, 0.1, 0.1, 0.4]]])
    layer_b = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0],
                             [0.6, 0.2, 0.2, 0.0], [0.2, 0.2, 0.2, 0.4]]])
    queries = torch.tensor([[False, False, True, True]])
    keys = torch.tensor([[True, True, False, False]])
    # Ā_a = (0.3, 0.2, 0.3, 0.2); KL(U_R || Ā) = 0.5 ln(0.5/0.3) + 0.5 ln(0.5/0.2)
    kl_a = 0.5 * math.log(0.5 / 0.3) + 0.5 * math.log(0.5 / 0.2)
    # Ā_b = (0.4, 0.2, 0.2, 0.2)
    kl_b = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.2)
    loss = attention_mass_loss([layer_a, layer_b], queries, keys)
    assert loss.shape == (1,)
    assert abs(float(loss[0]) - (kl_a + kl_b) / 2) < 1e-6
    # all of the queries' mass on R, spread evenly: zero loss
    even = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]]])
    assert abs(float(attention_mass_loss([even], queries, keys)[0])) < 1e-6
    # an empty R or S contributes nothing
    assert float(attention_mass_loss([layer_a], queries, torch.zeros_like(keys))[0]) == 0.0


def test_perturbation_tokens_are_the_image_tokens_with_the_largest_change():
    roles = torch.tensor([[PROMPT, IMAGE, IMAGE, IMAGE, IMAGE, TRIGGER, ANSWER]])
    change = [torch.tensor([0.1, 0.9, 0.3, 0.8])]
    mask = perturbation_tokens(change, roles, share=0.5)
    assert mask[0].nonzero()[:, 0].tolist() == [2, 4]  # image tokens 1 and 3
    assert perturbation_tokens(change, roles, share=0.1)[0].nonzero()[:, 0].tolist() == [2]
    with pytest.raises(ValueError, match="image tokens"):
        perturbation_tokens([torch.ones(3)], roles, share=0.5)


@pytest.mark.parametrize("name", ["lvlm-test", "smolvlm-lite-b", "smolvlm-lite-c",
                                  "smolvlm-lite-d", "smolvlm-lite-e"])
def test_embedded_token_regions_by_construction(name):
    adapter = adapter_for(name)
    spec = adapter.model.spec
    size, grid = spec.image_size, spec.grid
    regions = adapter.token_regions()
    assert regions.shape == (adapter.model.tokens_per_image(), size, size)
    cells = regions[: grid * grid]
    assert cells.any(dim=0).all()  # the grid covers every pixel
    image = torch.full((3, size, size), 0.5)
    clean = adapter.pixel_inputs([image])
    for token in (0, grid * grid - 1, grid + 1):
        row, col = divmod(token, grid)
        changed = image.clone()
        # change pixels well inside that cell only
        top, left = (row * size) // grid + 2, (col * size) // grid + 2
        changed[:, top:top + 4, left:left + 4] += 0.2
        rho = adapter.image_token_change(clean, adapter.pixel_inputs([changed]))[0]
        assert int(rho[: grid * grid].argmax()) == token
        if spec.global_token:
            assert 0 < float(rho[-1]) < float(rho[token])


def adapter_for(name: str):
    return create_embedded(name) if name != "lvlm-test" else create_lvlm("lvlm-test")


def _pgd_on(surrogate: LVLMSurrogate, images, texts, steps=6):
    reference = surrogate.reference(images, texts)
    start = random_start(images, 8 / 255, torch.Generator().manual_seed(0))
    loss = surrogate.noise_loss(texts, reference)
    with torch.no_grad():
        before = surrogate.measure([x + d for x, d in zip(images, start, strict=True)], texts,
                                   reference)
    deltas = pgd(images, start, loss, eps=8 / 255, step_size=1 / 255, steps=steps)
    with torch.no_grad():
        after = surrogate.measure([x + d for x, d in zip(images, deltas, strict=True)], texts,
                                  reference)
    return before, after


def _texts(surrogate, trigger_words=" zebra crossing"):
    ids = surrogate.primary.tokenizer(trigger_words, add_special_tokens=False)["input_ids"]
    return [TextItem(PROMPT_TEXT, "a sneaker", tuple(ids), "end") for _ in range(4)]


def test_exact_bph_noise_lowers_the_paper_loss(real_images):
    torch.manual_seed(0)
    surrogate = LVLMSurrogate(["lvlm-test"], binding="bph-exact", binding_weight=1.0,
                              binding_layers=1, perturbation_share=0.5)
    before, after = _pgd_on(surrogate, real_images, _texts(surrogate))
    assert after["binding_loss"] < before["binding_loss"]


def test_exact_crs_noise_raises_the_kl_from_the_clean_route(real_images):
    torch.manual_seed(0)
    surrogate = LVLMSurrogate(["lvlm-test"], binding="crs-kl", binding_weight=1.0,
                              binding_layers=2)
    before, after = _pgd_on(surrogate, real_images, _texts(surrogate))
    assert after["binding_loss"] < before["binding_loss"] <= 0  # -KL falls: KL grows


def test_max_objective_raises_the_training_loss_min_lowers_it(real_images):
    results = {}
    for objective in ("min", "max"):
        torch.manual_seed(0)
        surrogate = LVLMSurrogate(["lvlm-test"], binding="none", objective=objective)
        results[objective] = _pgd_on(surrogate, real_images, _texts(surrogate))
    assert results["min"][1]["train_loss"] < results["min"][0]["train_loss"]
    assert results["max"][1]["train_loss"] > results["max"][0]["train_loss"]


def test_crs_reference_aligns_clean_keys_around_the_inserted_trigger(adapter, real_images):
    plain = [TextExample(PROMPT_TEXT, "a sneaker")]
    triggered = [TextExample(PROMPT_TEXT, "a sneaker", "zebra crossing", "end")]
    pixels = adapter.pixel_inputs(real_images[:1])
    clean = adapter.encode(plain, pixels)
    protected = adapter.encode(triggered, pixels)
    with torch.no_grad():
        layers = adapter.forward(clean, pixels, True, attention_layers=2).layer_attentions
        rows = answer_rows(layers, clean)
        aligned = align_to_protected(rows, clean, protected)
        protected_layers = adapter.forward(protected, pixels, True,
                                           attention_layers=2).layer_attentions
    for row in aligned:
        assert abs(float(row.sum()) - 1) < 1e-5
        assert float(row[protected.roles == TRIGGER].sum()) == 0.0
    # the protected input's own rows against the aligned clean ones: a finite, positive KL
    kl = -crs_kl_loss(protected_layers, protected, aligned)
    assert float(kl[0]) > 0 and math.isfinite(float(kl[0]))
    # and an input compared with itself has zero KL
    same = answer_rows(protected_layers, protected)
    assert abs(float(crs_kl_loss(protected_layers, protected, same)[0])) < 1e-5


def test_exact_bph_is_zero_only_when_every_path_is_bound():
    # 6 positions: image (perturbed), image, prompt, trigger, answer-predicting, answer
    roles = torch.tensor([[IMAGE, IMAGE, PROMPT, TRIGGER, ANSWER, ANSWER]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 7]])  # position 4 predicts it
    batch = EncodedBatch(torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long),
                         labels, roles)
    omega = torch.tensor([[True, False, False, False, False, False]])
    bound = torch.zeros(1, 6, 6)
    bound[0, 3, 0] = 1.0  # trigger -> perturbed image token
    bound[0, 4, 0], bound[0, 4, 3] = 0.5, 0.5  # answer -> perturbation and trigger
    loss = bph_exact_loss([bound], batch, omega)
    # answer->{trigger}: KL(U||Ā) = ln(1/0.5); answer->{Ωδ}: ln 2; trigger->{Ωδ}: 0
    assert abs(float(loss[0]) - 2 * math.log(2)) < 1e-5
    content = torch.zeros(1, 6, 6)
    content[0, 3, 2] = 1.0
    content[0, 4, 1], content[0, 4, 2] = 0.5, 0.5  # attends to content, not the bridge
    assert float(bph_exact_loss([content], batch, omega)[0]) > float(loss[0]) + 10


@pytest.mark.parametrize("binding", ["bph-exact", "crs-kl"])
def test_mmguard_protects_with_the_exact_losses_and_max_objective(tmp_path, binding):
    import json

    from mmguard.protect.registry import create_method
    from mmguard.protect.run import protect_dataset

    method = create_method("mmguard", "triples", surrogates=("lvlm-test",), rounds=1,
                           pgd_steps=2, top_k=3, batch_size=4, binding=binding,
                           binding_layers=1, objective="max", inner_steps=1)
    protect_dataset(load_builtin("digits", "train", "triples"), method, tmp_path / "out",
                    limit=4, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["config"]["binding"] == binding and record["config"]["objective"] == "max"
    assert record["config"]["inner_steps"] == 1
    assert "binding_loss" in record["optimisation"]["rounds"][0]
    assert max(item["linf_levels"] for item in record["items"]) <= 8


@pytest.mark.parametrize("surrogate", ["llava-tiny", "qwen2-vl-tiny", "idefics3-tiny"])
def test_mmguard_bph_exact_runs_on_hugging_face_surrogates(tmp_path, surrogate):
    """The exact BPH ranks each surrogate's image tokens by the change of the pixels they
    cover; every Hugging Face family (a whole image, flattened patches, tiles) says which."""
    import json

    from mmguard.protect.registry import create_method
    from mmguard.protect.run import protect_dataset

    method = create_method("mmguard", "triples", surrogates=(surrogate,), rounds=1,
                           pgd_steps=2, top_k=3, batch_size=4, binding="bph-exact",
                           binding_layers=1)
    protect_dataset(load_builtin("digits", "train", "triples"), method, tmp_path / "out",
                    limit=4, progress=False)
    record = json.loads((tmp_path / "out" / "mmguard-run.json").read_text())
    assert record["config"]["surrogates"] == [surrogate]
    assert math.isfinite(record["optimisation"]["rounds"][0]["binding_loss"])
    assert max(item["linf_levels"] for item in record["items"]) <= 8


def test_inner_lora_adaptation_changes_the_loss_and_is_discarded_each_round(real_images):
    torch.manual_seed(0)
    surrogate = LVLMSurrogate(["lvlm-test"], binding="none", inner_steps=3, inner_lr=1e-2)
    texts = _texts(surrogate)
    with torch.no_grad():
        before = surrogate.measure(real_images, texts)["train_loss"]
    assert len(surrogate.inner[0][0]) > 0  # LoRA weights were injected
    surrogate.adapt(real_images, texts)
    with torch.no_grad():
        adapted = surrogate.measure(real_images, texts)["train_loss"]
    assert adapted < before  # it learnt the batch
    surrogate.end_round()
    with torch.no_grad():
        reset = surrogate.measure(real_images, texts)["train_loss"]
    assert abs(reset - before) < 1e-5  # and forgot it
    # the projector-only bilevel state never carries the LoRA weights
    assert surrogate.state()["projectors"] == []
