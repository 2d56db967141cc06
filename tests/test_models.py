"""The open_clip models behind the ContrastiveModel contract, the registry and InfoNCE."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmguard.errors import MMGuardError
from mmguard.models.contrastive import MAX_LOGIT_SCALE, info_nce
from mmguard.models.open_clip_model import OpenClipModel
from mmguard.models.registry import create_contrastive_model

EOT = 49407
SOT = 49406
SIZES = [(3, 20, 30), (3, 32, 32), (3, 57, 41)]  # (C, H, W), different sizes


@pytest.fixture(scope="module")
def rn() -> OpenClipModel:
    torch.manual_seed(0)
    model = create_contrastive_model("rn-test")
    return model.eval()


@pytest.fixture(scope="module")
def words(rn) -> list[int]:
    return rn.word_token_ids()


def random_images(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=generator) for size in SIZES]


def test_rn_test_shape(rn):
    assert isinstance(rn, OpenClipModel)
    assert rn.context_length == 16
    assert rn.preprocess.size == 32
    assert rn.tokenizer.eot_token_id == EOT and rn.tokenizer.sot_token_id == SOT
    assert rn.trigger_offset == 1


def test_encode_images_of_different_sizes(rn):
    images = random_images(0)
    features = rn.encode_images(images)
    assert features.shape == (3, 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Eval mode: each row is what the image gives alone.
    for row, image in zip(features, images, strict=True):
        assert torch.allclose(row, rn.encode_images([image])[0], atol=1e-5)
    assert not torch.equal(features[0], features[1])


def test_gradient_reaches_input_pixels(rn):
    images = [image.requires_grad_(True) for image in random_images(1)]
    target = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    (rn.encode_images(images) * target).sum().backward()
    for image in images:
        assert image.grad is not None
        assert torch.isfinite(image.grad).all()
        assert float(image.grad.abs().sum()) > 0
        assert float((image.grad != 0).float().mean()) > 0.5


def test_replaced_embeddings_equal_table_lookup_and_grads_stop_at_eot(rn):
    ids = rn.tokenize(["a cat on a mat", "hello", "two dogs running on the beach"])
    assert ids.shape == (3, 16)
    with torch.no_grad():
        plain = rn.encode_text(ids)
    embeddings = rn.token_embeddings(ids).detach().requires_grad_(True)
    replaced = rn.encode_text(ids, replace_embeddings=embeddings)
    assert torch.allclose(replaced, plain, atol=1e-6)
    assert torch.allclose(replaced.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The hook is cleared afterwards: a plain call again gives the table's features.
    with torch.no_grad():
        assert torch.allclose(rn.encode_text(ids), plain, atol=1e-6)

    weights = torch.randn(3, replaced.shape[1], generator=torch.Generator().manual_seed(3))
    (replaced * weights).sum().backward()
    grad_norm = embeddings.grad.norm(dim=-1)  # (3, 16)
    for row in range(3):
        eot = int((ids[row] == EOT).nonzero()[0])
        assert (grad_norm[row, :eot + 1] > 0).all(), row
        assert (grad_norm[row, eot + 1:] == 0).all(), row
    assert int((ids[1] == EOT).nonzero()[0]) == 2  # "hello": sot, hello, eot, then padding


def test_padding_cut_is_exact_for_features_and_gradients(rn):
    """encode_text drops the columns after the last end-of-text token (HotFlip speed);
    features and parameter gradients must equal open_clip's full-length forward."""
    ids = rn.tokenize(["a cat", "hello", "two dogs on a beach"])
    assert int(ids.argmax(dim=-1).max()) + 1 < rn.context_length  # there is padding to cut
    weights = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    grads = []
    for encode in (rn.encode_text, lambda t: torch.nn.functional.normalize(
            rn.clip.encode_text(t), dim=-1)):
        rn.zero_grad()
        features = encode(ids)
        (features * weights).sum().backward()
        grads.append((features.detach(), rn.clip.positional_embedding.grad.clone(),
                      rn.clip.token_embedding.weight.grad.clone()))
    rn.zero_grad()
    (short, short_pos, short_tok), (full, full_pos, full_tok) = grads
    assert torch.allclose(short, full, atol=1e-5)
    assert torch.allclose(short_pos, full_pos, atol=1e-5)
    assert torch.allclose(short_tok, full_tok, atol=1e-5)
    assert float(full_pos.abs().sum()) > 0


def test_word_token_ids_are_single_words_that_round_trip(rn, words):
    assert len(words) > 20000
    assert words == sorted(set(words))
    for index in random.Random(0).sample(words, 200):
        text = rn.decode([index])
        assert text.isascii() and text.isalpha() and len(text) >= 2, (index, text)
        assert " " not in text
        assert rn.text_token_ids(text) == [index], (index, text)
    the = rn.text_token_ids("the")
    assert len(the) == 1 and the[0] in set(words)


def test_word_token_ids_are_all_such_ids(rn, words):
    chosen = set(words)
    rng = random.Random(1)
    vocabulary = range(rn.token_embeddings.num_embeddings)
    others = [i for i in rng.sample(vocabulary, 3000) if i not in chosen][:300]
    assert len(others) == 300
    for index in others:
        text = rn.decode([index])
        is_word = text.isascii() and text.isalpha() and len(text) >= 2
        assert not (is_word and rn.text_token_ids(text) == [index]), (index, text)


CAPTIONS = ["a cat on a mat", "A Red CAR, parked outside!", "hello... world?? it's fine",
            "Two DOGS; one ball."]
LONG_CAPTION = ("one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen")


@pytest.mark.parametrize("length", [3, 5])
def test_compose_ids_equals_tokenizing_the_written_trigger(rn, words, length):
    rng = random.Random(length)
    for caption in CAPTIONS:
        for _ in range(3):
            trigger = rng.sample(words, length)
            caption_ids = rn.text_token_ids(caption)
            assert length + len(caption_ids) + 2 <= rn.context_length
            composed = rn.compose_ids(trigger, caption_ids)
            written = rn.tokenize([rn.decode(trigger) + " " + caption])[0]
            assert composed.dtype == torch.long and composed.shape == (16,)
            assert torch.equal(composed, written), (trigger, caption)


@pytest.mark.parametrize("length", [3, 5])
def test_compose_ids_keeps_the_trigger_when_the_caption_overflows(rn, words, length):
    rng = random.Random(10 + length)
    caption_ids = rn.text_token_ids(LONG_CAPTION)
    assert len(caption_ids) + length + 2 > rn.context_length
    for _ in range(3):
        trigger = rng.sample(words, length)
        composed = rn.compose_ids(trigger, caption_ids).tolist()
        assert len(composed) == rn.context_length
        assert composed[0] == SOT
        assert composed[1:1 + length] == trigger
        assert composed[-1] == EOT
        assert EOT not in composed[:-1]
        # The caption's head survives, its tail is cut.
        room = rn.context_length - 2 - length
        assert composed[1 + length:-1] == caption_ids[:room]


def test_logits_clamp_temperature_at_100(rn):
    features = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    original = rn.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            rn.logit_scale.fill_(math.log(1000.0))
        logits = rn.logits(features, features).detach()
        assert float(logits.abs().max()) <= MAX_LOGIT_SCALE + 1e-4
        assert torch.allclose(logits.diagonal(), torch.full((4,), 100.0), atol=1e-4)
        with torch.no_grad():
            rn.logit_scale.fill_(math.log(10.0))
        assert torch.allclose(rn.logits(features, features).detach().diagonal(),
                              torch.full((4,), 10.0), atol=1e-4)
    finally:
        with torch.no_grad():
            rn.logit_scale.copy_(original)


def test_registry_rejects_unknown_names():
    with pytest.raises(MMGuardError, match="unknown model"):
        create_contrastive_model("rn-nope")
    with pytest.raises(MMGuardError, match="unknown model"):
        create_contrastive_model("")


def test_registry_unknown_open_clip_architecture_is_a_user_error():
    # A typo after open_clip: must be reported like any unknown name, not as a
    # raw RuntimeError traceback from open_clip.
    with pytest.raises(MMGuardError):
        create_contrastive_model("open_clip:mmguard-no-such-arch")


def test_registry_accepts_open_clip_names():
    model = create_contrastive_model("open_clip:mmguard-rn-test")
    assert isinstance(model, OpenClipModel)
    assert model.architecture == "mmguard-rn-test"
    assert model.context_length == 16 and model.preprocess.size == 32


def test_info_nce_none_averages_to_mean():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(4)) * 3
    per_pair = info_nce(logits, reduction="none")
    assert per_pair.shape == (5,)
    assert torch.allclose(per_pair.mean(), info_nce(logits), atol=1e-6)


def test_info_nce_by_hand_2x2():
    a, b, c, d = 2.0, -1.0, 0.5, 3.0
    logits = torch.tensor([[a, b], [c, d]])

    def nll(value, *others):
        return -value + math.log(sum(math.exp(x) for x in (value, *others)))

    pair0 = (nll(a, b) + nll(a, c)) / 2  # row 0 (image 0), column 0 (text 0)
    pair1 = (nll(d, c) + nll(d, b)) / 2
    per_pair = info_nce(logits, reduction="none")
    assert torch.allclose(per_pair, torch.tensor([pair0, pair1]), atol=1e-6)
    assert math.isclose(float(info_nce(logits)), (pair0 + pair1) / 2, abs_tol=1e-6)


def test_vit_tiny_images_and_text():
    torch.manual_seed(0)
    vit = create_contrastive_model("vit-tiny").eval()
    assert vit.preprocess.size == 64 and vit.context_length == 32
    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(size, generator=generator).requires_grad_(True)
              for size in [(3, 64, 64), (3, 50, 90), (3, 100, 70)]]
    features = vit.encode_images(images)
    assert features.shape == (3, 128)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    ids = vit.tokenize(["a small red square", "hello"])
    embeddings = vit.token_embeddings(ids).detach().requires_grad_(True)
    text = vit.encode_text(ids, replace_embeddings=embeddings)
    with torch.no_grad():
        assert torch.allclose(text, vit.encode_text(ids), atol=1e-6)
    info_nce(vit.logits(features[:2], text)).backward()
    for image in images[:2]:
        assert float(image.grad.abs().sum()) > 0
    assert float(images[2].grad.abs().sum()) == 0  # not in the loss
    grad_norm = embeddings.grad.norm(dim=-1)
    assert (grad_norm[1, :3] > 0).all() and (grad_norm[1, 3:] == 0).all()


# -- the other adapters: same contract -------------------------------------------------


@pytest.fixture(scope="module", params=["hf-clip-tiny", "lit", "lit-dino"])
def other_model(request):
    return create_contrastive_model(request.param)


def test_other_adapters_keep_the_contract(other_model):
    model = other_model
    images = [torch.rand(3, 70, 50, requires_grad=True), torch.rand(3, 64, 64)]
    features = model.encode_images(images)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    features.sum().backward()
    assert images[0].grad.abs().sum() > 0
    words = model.word_token_ids()
    assert len(words) > 10_000
    caption = "A grinning face, with big eyes!"
    trigger = words[1000:1003]
    written = model.decode(trigger) + " " + caption
    assert torch.equal(model.tokenize([written])[0],
                       model.compose_ids(trigger, model.text_token_ids(caption)))
    ids = model.tokenize([caption, "flag: France"])
    embeddings = model.token_embeddings(ids).detach().requires_grad_(True)
    swapped = model.encode_text(ids, replace_embeddings=embeddings)
    assert torch.allclose(swapped, model.encode_text(ids), atol=1e-5)
    swapped.sum().backward()
    assert embeddings.grad[:, model.trigger_offset].abs().sum() > 0


def test_hf_clip_tokenizer_built_offline_matches_open_clip():
    import open_clip

    model = create_contrastive_model("hf-clip-tiny")
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    for text in ["a Grinning face, with big eyes!", "family: man, woman, boy", "café ☕ 123",
                 "it's 5 o'clock,   don't", "flag: Åland Islands"]:
        ours, theirs = model.tokenize([text])[0].tolist(), reference([text])[0].tolist()
        end = theirs.index(reference.eot_token_id)
        assert ours[: end + 1] == theirs[: end + 1], text


def test_projection_recipe_trains_only_heads():
    from mmguard.attack.contrastive import AttackerRecipe, _build_model

    model = _build_model(AttackerRecipe(model="rn-test", recipe="projection"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head_parameters()}
    assert 0 < len(trainable) < len(list(model.parameters()))


def test_a_random_init_model_builds_without_a_pretrained_weights_warning(caplog, capfd):
    import logging

    from mmguard.models.registry import create_contrastive_model

    with caplog.at_level(logging.INFO):
        create_contrastive_model("rn-test")
    assert not [r for r in caplog.records if "pretrained weights" in r.getMessage()]
    assert "pretrained weights" not in capfd.readouterr().err


def test_lit_dino_sees_through_the_pretrained_dinov2_tower():
    from mmguard.models.lvlm.dinov2 import load_dinov2
    from mmguard.models.registry import pretrained_by_construction

    model = create_contrastive_model("lit-dino")
    assert pretrained_by_construction("lit-dino")
    image = torch.rand(3, 90, 130)
    pixels = model.preprocess([image])
    assert pixels.shape == (1, 3, 112, 112)  # 8x8 patches of 14 px
    grid, cls = load_dinov2().features(pixels)
    with torch.no_grad():
        assert torch.allclose(model.image_tower_features(pixels),
                              torch.cat([cls, grid.mean(dim=(2, 3))], dim=-1), atol=1e-5)
