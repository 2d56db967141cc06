"""Hugging Face LVLM adapters on tiny random configs of the real classes (CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmguard.data.builtin import load_builtin
from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import (
    ANSWER,
    IMAGE,
    PROMPT,
    TRIGGER,
    TextExample,
    response_loss,
)
from mmguard.models.lvlm.hf_families import HF_LVLM_MODELS, create_hf_lvlm
from mmguard.models.lvlm.registry import create_lvlm, lvlm_models

FAMILIES = ["llava-tiny", "qwen2-vl-tiny", "qwen2.5-vl-tiny", "idefics3-tiny"]
PROMPT_TEXT = "What does this emoji show?"
RESPONSE = "rolling on the floor laughing"
TRIGGER_TEXT = "zebra quartz"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return create_lvlm(request.param)


@pytest.fixture(scope="module")
def pil_images() -> list[Image.Image]:
    """Real emoji images (64 px) and non-square resizes of them."""
    records = load_builtin("emoji", "test", "triples").records[:6]
    images = [record.image.opener().convert("RGB") for record in records]
    return images + [images[0].resize((50, 70), Image.Resampling.BICUBIC),
                     images[1].resize((90, 40), Image.Resampling.BICUBIC)]


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def example(trigger: str | None = TRIGGER_TEXT, position: str | int = 2,
            response: str | None = RESPONSE) -> TextExample:
    return TextExample(PROMPT_TEXT, response, trigger, position)


def decoded(adapter, batch, role: int, row: int = 0) -> str:
    ids = batch.input_ids[row][batch.roles[row] == role].tolist()
    return adapter.tokenizer.decode(ids)


# -- loss on the response only ---------------------------------------------------------------
def test_labels_are_the_response_tokens_only(adapter, pil_images):
    pixels = adapter.pixel_inputs([as_tensor(pil_images[0]), as_tensor(pil_images[6])])
    batch = adapter.encode([example(), example(None, response="yes")], pixels)
    answer = batch.roles == ANSWER
    assert torch.equal(batch.labels[answer], batch.input_ids[answer])
    assert (batch.labels[~answer] == -100).all()


def test_loss_is_cross_entropy_over_response_positions_of_the_full_logits(adapter, pil_images):
    images = [as_tensor(pil_images[0]), as_tensor(pil_images[6])]
    pixels = adapter.pixel_inputs(images)
    batch = adapter.encode([example(), example(None, response="a small cat")], pixels)
    with torch.no_grad():
        loss = adapter.forward(batch, pixels).loss
        logits = adapter.model(**adapter.model_inputs(batch, pixels)).logits
    for row in range(2):
        targets = batch.labels[row, 1:]
        keep = targets != -100
        manual = F.cross_entropy(logits[row, :-1][keep], targets[keep])
        assert loss[row].item() == pytest.approx(manual.item(), abs=1e-4)
    # Scores at positions that predict prompt (or any non-response) tokens do not count.
    noisy = logits.clone()
    predicts_response = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts_response[:, :-1] = batch.labels[:, 1:] != -100
    noisy[~predicts_response] += 5 * torch.randn_like(noisy[~predicts_response])
    assert torch.allclose(response_loss(noisy, batch.labels), response_loss(logits, batch.labels))


def test_changing_the_response_changes_the_loss(adapter, pil_images):
    images = [as_tensor(pil_images[0])] * 2
    with torch.no_grad():
        losses = adapter.loss(images, [example(), example(response="a red bicycle")]).loss
    assert abs(losses[0].item() - losses[1].item()) > 1e-4


# -- token index sets ----------------------------------------------------------------------
def test_index_sets_by_construction(adapter, pil_images):
    pixels = adapter.pixel_inputs([as_tensor(pil_images[0])])
    batch = adapter.encode([example()], pixels)
    image = batch.roles[0] == IMAGE
    assert image.sum().item() == pixels.tokens_per_image[0]
    image_id = adapter.tokenizer.convert_tokens_to_ids(adapter.image_token)
    assert (batch.input_ids[0][image] == image_id).all()
    assert (batch.input_ids[0][~image] != image_id).all()
    assert decoded(adapter, batch, PROMPT).split() == PROMPT_TEXT.split()
    assert decoded(adapter, batch, TRIGGER).strip() == TRIGGER_TEXT
    assert decoded(adapter, batch, ANSWER).strip() == RESPONSE + adapter.end_of_turn


def real_processor(adapter):
    """The family's own Hugging Face processor around the adapter's tokenizer and image
    processor (built offline)."""
    import transformers

    if "llava" in adapter.name:
        return transformers.LlavaProcessor(
            image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
            patch_size=adapter.model.config.vision_config.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if "qwen" in adapter.name:
        return transformers.Qwen2VLProcessor(
            image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
            video_processor=transformers.Qwen2VLVideoProcessor())
    return transformers.Idefics3Processor(image_processor=adapter.image_processor,
                                          tokenizer=adapter.tokenizer,
                                          image_seq_len=adapter.image_seq_len)


def test_encoding_matches_the_real_processor(adapter, pil_images):
    """The templated prompt through the family's own HF processor (image placeholder
    expanded by it) gives exactly the adapter's ids."""
    processor = real_processor(adapter)
    for image in (pil_images[0], pil_images[6]):
        pixels = adapter.pixel_inputs([as_tensor(image)])
        ours = adapter.encode([TextExample(PROMPT_TEXT)], pixels)
        text, token = ours.texts[0], adapter.image_token
        if "idefics3" in adapter.name:  # its processor writes the whole image block itself
            start = text.index("<fake_token_around_image>")
            end = text.rindex("<fake_token_around_image>") + len("<fake_token_around_image>")
        else:
            start, end = text.index(token), text.rindex(token) + len(token)
        unexpanded = text[:start] + token + text[end:]
        reference = processor(images=[image], text=[unexpanded], return_tensors="pt")
        assert reference["input_ids"][0].tolist() == ours.input_ids[0].tolist()


def test_trigger_insertion_keeps_the_prompt_tokens(adapter, pil_images):
    pixels = adapter.pixel_inputs([as_tensor(pil_images[0])])
    clean = adapter.encode([example(None)], pixels)
    clean_prompt = clean.input_ids[0][clean.roles[0] == PROMPT].tolist()
    first = int((clean.roles[0] == PROMPT).nonzero()[0])
    for position in ("start", 1, 3, "end"):
        batch = adapter.encode([example(position=position)], pixels)
        assert torch.equal(batch.input_ids[0, :first], clean.input_ids[0, :first])
        assert decoded(adapter, batch, PROMPT).split() == PROMPT_TEXT.split()
        if position != "start":  # at the start the first word gains a leading space
            assert batch.input_ids[0][batch.roles[0] == PROMPT].tolist() == clean_prompt


def test_verify_trigger_accepts_a_clean_trigger_and_rejects_one_that_merges(adapter):
    tokenizer = adapter.tokenizer
    count = adapter.pixel_inputs([torch.rand(3, 64, 64)]).tokens_per_image[0]
    clean = adapter.trigger_token_ids(example(), count)
    assert adapter.verify_trigger(example(), clean, count)
    # " in" + "to" decode to " into", which the tokenizer reads as one token.
    merging = tokenizer(" in", add_special_tokens=False)["input_ids"] + \
        tokenizer("to", add_special_tokens=False)["input_ids"]
    assert len(merging) == 2
    assert len(tokenizer(" into", add_special_tokens=False)["input_ids"]) == 1
    assert not adapter.verify_trigger(example(), merging, count)


# -- gradients -----------------------------------------------------------------------------
def test_gradients_reach_the_pixels(adapter, pil_images):
    image = as_tensor(pil_images[6]).requires_grad_(True)
    adapter.loss([image], [example()]).loss.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_embedding_gradients_reach_trigger_positions(adapter, pil_images):
    pixels = adapter.pixel_inputs([as_tensor(pil_images[0])])
    batch = adapter.encode([example()], pixels)
    with adapter.embedding_gradients() as holder:
        adapter.forward(batch, pixels).loss.sum().backward()
    grad = holder["embeds"].grad[0].abs().sum(dim=-1)
    assert (grad[batch.roles[0] == TRIGGER] > 0).all()
    assert (grad[batch.roles[0] == IMAGE] == 0).all()  # replaced by image features


def test_attention_maps_cover_the_sequence(adapter, pil_images):
    pixels = adapter.pixel_inputs([as_tensor(pil_images[0])])
    batch = adapter.encode([example()], pixels)
    with torch.no_grad():
        attention = adapter.forward(batch, pixels, output_attentions=True).attention
    length = batch.input_ids.shape[1]
    assert attention.shape == (1, length, length)
    assert torch.allclose(attention.sum(dim=-1), torch.ones(1, length), atol=1e-4)


# -- the image processor -------------------------------------------------------------------
def assert_matches_processor(adapter, processor, pil_images):
    for image in pil_images:
        ours = adapter.pixel_inputs([as_tensor(image)])
        reference = processor(images=[image], return_tensors="pt")
        for key, value in ours.tensors.items():
            assert value.shape == reference[key].shape, key
            if value.is_floating_point():
                assert (value - reference[key]).abs().max().item() <= 1e-2, key
            else:
                assert torch.equal(value, reference[key]), key
    batch = adapter.pixel_inputs([as_tensor(image) for image in pil_images[-3:]])
    # One image per sample, as the processors see a batch of (image, prompt) pairs.
    reference = processor(images=[[image] for image in pil_images[-3:]], return_tensors="pt")
    for key, value in batch.tensors.items():
        assert value.shape == reference[key].shape, key
        assert (value.float() - reference[key].float()).abs().max().item() <= 1e-2, key


def test_processor_matches_the_default_hf_processor(adapter, pil_images, tmp_path):
    from transformers import AutoImageProcessor
    from transformers.image_processing_backends import TorchvisionBackend

    adapter.image_processor.save_pretrained(tmp_path)
    default = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(default, TorchvisionBackend)  # the backend the adapter reproduces
    assert_matches_processor(adapter, default, pil_images)


def test_idefics3_processor_without_image_splitting(pil_images):
    from transformers import Idefics3ImageProcessor

    from mmguard.models.lvlm.idefics3 import Idefics3Adapter

    tiny = create_hf_lvlm("idefics3-tiny")
    processor = Idefics3ImageProcessor(size={"longest_edge": 64},
                                       max_image_size={"longest_edge": 32},
                                       do_image_splitting=False)
    adapter = Idefics3Adapter("idefics3-nosplit", tiny.model, tiny.tokenizer, processor)
    assert_matches_processor(adapter, processor, pil_images)
    assert adapter.pixel_inputs([as_tensor(pil_images[0])]).tokens_per_image == [4]
    # One 32 px tile of 2x2 tokens, 16 px each: token 2 is its lower-left square.
    clean = adapter.pixel_inputs([as_tensor(pil_images[0])])
    protected = adapter.pixel_inputs([as_tensor(pil_images[0])])
    protected.tensors["pixel_values"][0, 0, :, 16:32, 0:16] += 0.3
    rho = adapter.image_token_change(clean, protected)[0]
    assert rho.tolist() == pytest.approx([0.0, 0.0, 0.3, 0.0], abs=1e-6)


# -- which pixels each image token covers (MMGuard's ρ, Eqs 21-23) ---------------------------
# Per family: an image size the processor leaves as it is (raw and processed pixels coincide),
# one image token, the square of pixels (top, bottom, left, right) it covers, and the tokens
# that see that square only through a downscaled copy (Idefics3's global image).
# llava-tiny: 7 px patches of 28 px, token 6 = row 1, col 2. qwen: 56x84 px -> 2x3 tokens of
# 28 px, token 4 = row 1, col 1. idefics3: 64 px -> 2x2 tiles of 32 px, each 2x2 tokens of
# 16 px, then the global image; token 10 = tile (1, 0), square (1, 0), which the global
# image's own square (1, 0), token 16 + 2, shows downscaled.
REGION_CASES = {
    "llava-tiny": ((28, 28), 6, (7, 14, 14, 21), ()),
    "qwen2-vl-tiny": ((56, 84), 4, (28, 56, 28, 56), ()),
    "qwen2.5-vl-tiny": ((56, 84), 4, (28, 56, 28, 56), ()),
    "idefics3-tiny": ((64, 64), 10, (48, 64, 0, 16), (18,)),
}
STEP = 0.2  # 51 of 255 levels: exact on the 8-bit grid


def changed_in(image: torch.Tensor, square: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = square
    changed = image.clone()
    changed[:, top:bottom, left:right] += STEP
    return changed


def test_token_change_by_construction(adapter):
    """Changing exactly one token's square of the image gives that token the whole
    change (STEP in normalised units) and every other token none (in Idefics3, the
    global image's token over the same square gets a smaller share)."""
    size, token, square, downscaled = REGION_CASES[adapter.name]
    image = torch.full((3, *size), 0.4)
    clean = adapter.pixel_inputs([image])
    rho = adapter.image_token_change(clean, adapter.pixel_inputs([changed_in(image, square)]))[0]
    assert len(rho) == clean.tokens_per_image[0]
    assert int(rho.argmax()) == token
    std = torch.tensor(adapter.image_processor.image_std)
    assert float(rho[token]) == pytest.approx(float((STEP / std).mean()), rel=1e-4)
    others = [t for t in range(len(rho)) if t != token and t not in downscaled]
    assert (rho[others] == 0).all()
    for seen in downscaled:
        assert 0 < float(rho[seen]) < float(rho[token])


def test_block_labels_and_region_means_by_hand():
    from mmguard.models.lvlm.hf_common import TokenRegions, block_labels, region_means

    labels = block_labels(5, 7, 2, first=1)  # 2x3 blocks; row 4 and column 6 unread
    assert labels[0].tolist() == [1, 1, 2, 2, 3, 3, -1]
    assert labels[3].tolist() == [4, 4, 5, 5, 6, 6, -1]
    assert (labels[4] == -1).all()
    change = torch.zeros(3, 5, 7)
    change[0, 2:4, 2:4] = 3.0  # block 5, one channel of three: mean 1
    change[:, 4, :] = 9.0  # unread pixels count for nobody
    means = region_means(change, TokenRegions(0, labels[None], 7, whole=(0,)))
    assert means.tolist() == pytest.approx([1 / 6, 0, 0, 0, 0, 1, 0])


def first_stage_tokens(adapter, pixel_values: torch.Tensor) -> torch.Tensor:
    """(image tokens, D) of the first image: the model's own patch embedding and its
    grouping of patches into language-model tokens (CLS dropped, merger, pixel shuffle),
    before any attention mixes the patches."""
    model = adapter.model.model
    if "llava" in adapter.name:
        tokens = model.vision_tower.embeddings(pixel_values[:1])[0]
        strategy = adapter.model.config.vision_feature_select_strategy
        return tokens[1:] if strategy == "default" else tokens
    if "qwen" in adapter.name:
        return model.visual.merger(model.visual.patch_embed(pixel_values))
    tiles = pixel_values[0]
    mask = torch.ones(len(tiles), *tiles.shape[-2:], dtype=torch.bool)
    patch = adapter.model.config.vision_config.patch_size
    patches = model.vision_model.embeddings(tiles, mask[:, ::patch, ::patch].contiguous())
    shuffled = model.connector.pixel_shuffle(patches.contiguous(),
                                             adapter.model.config.scale_factor)
    return shuffled.flatten(0, 1)


def test_token_regions_follow_the_models_own_patch_order(adapter, pil_images):
    """Perturbing the processed pixels of region k moves exactly the k-th token of the
    model's patch embedding + token grouping: the regions are in sequence order."""
    pixels = adapter.pixel_inputs([as_tensor(pil_images[7])])  # 90x40: a non-square grid
    regions = adapter.token_regions(pixels)[0]
    values = pixels.tensors["pixel_values"]
    count = pixels.tokens_per_image[0]
    with torch.no_grad():
        clean = first_stage_tokens(adapter, values)
        assert len(clean) == count
        for token in sorted({0, 1, count // 2 + 1, count - 1}):
            changed = values.clone()
            part = changed[regions.rows]
            part[regions.labels.expand_as(part) == token] += 0.5
            moved = (first_stage_tokens(adapter, changed) - clean).abs().amax(dim=-1) > 1e-5
            assert moved.nonzero()[:, 0].tolist() == [token]


def test_token_change_of_a_mixed_batch_is_per_image(adapter, pil_images):
    """Two images of different sizes (other grids, tile counts): one entry per image
    token of each, and a change to the second image is not seen in the first."""
    images = [as_tensor(pil_images[6]), as_tensor(pil_images[7])]
    clean = adapter.pixel_inputs(images)
    assert [len(r) for r in adapter.image_token_change(clean, clean)] == clean.tokens_per_image
    noisy = images[1] + 0.05 * torch.randn(images[1].shape, generator=torch.Generator()
                                           .manual_seed(0))
    rho = adapter.image_token_change(clean, adapter.pixel_inputs([images[0], noisy.clamp(0, 1)]))
    assert [len(r) for r in rho] == clean.tokens_per_image
    assert (rho[0] == 0).all() and (rho[1] > 0).all()
    if "llava" not in adapter.name:  # LLaVA processes every image to one size
        with pytest.raises(MMGuardError, match="different layouts"):
            adapter.image_token_change(clean, adapter.pixel_inputs(images[::-1]))


def test_llava_cls_token_kept_by_the_full_strategy_sees_the_whole_image():
    from mmguard.models.lvlm.llava import tiny_llava

    adapter = tiny_llava()
    adapter.model.config.vision_feature_select_strategy = "full"
    size, token, square, _ = REGION_CASES["llava-tiny"]
    image = torch.full((3, *size), 0.4)
    clean = adapter.pixel_inputs([image])
    protected = adapter.pixel_inputs([changed_in(image, square)])
    rho = adapter.image_token_change(clean, protected)[0]
    assert len(rho) == clean.tokens_per_image[0] == 17
    assert int(rho[1:].argmax()) == token  # the patches come after CLS
    whole = (protected.tensors["pixel_values"] - clean.tensors["pixel_values"]).abs().mean()
    assert float(rho[0]) == pytest.approx(float(whole), rel=1e-5)
    assert 0 < float(rho[0]) < float(rho[1 + token])
    with torch.no_grad():  # and the model indeed gives 17 image tokens
        assert torch.isfinite(adapter.loss([image], [example()]).loss).all()


# -- generation, recipes, registry ---------------------------------------------------------
def test_generate_returns_strings(adapter, pil_images):
    images = [as_tensor(pil_images[0]), as_tensor(pil_images[6])]
    answers = adapter.generate(images, [example(), example(None)], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_recipes_name_the_projector_and_the_language_model(adapter):
    projector = {id(p) for p in adapter.projector().parameters()}
    assert {id(p) for p in adapter.trainable_parameters("projector")} == projector
    full = {id(p) for p in adapter.trainable_parameters("full")}
    vision = {id(p) for p in adapter.vision_tower().parameters()} - projector
    assert projector <= full and not full & vision
    names = adapter.lora_target_modules()
    modules = dict(adapter.model.named_modules())
    language = {id(m) for m in adapter.language_model().modules()}
    assert len(names) == 4 * 2 and all(id(modules[name]) in language for name in names)


def test_a_saved_checkpoint_loads_by_its_model_type(adapter, pil_images, tmp_path):
    """The checkpoint path (AutoConfig -> family, from_pretrained, AutoProcessor) on a local
    folder, since the hub is out of reach: same model, same processor, same loss."""
    adapter.model.save_pretrained(tmp_path)
    real_processor(adapter).save_pretrained(tmp_path)
    loaded = create_hf_lvlm(str(tmp_path))
    assert type(loaded) is type(adapter)
    assert loaded.model.config._attn_implementation == "eager"
    images = [as_tensor(pil_images[0])]
    with torch.no_grad():
        expected = adapter.loss(images, [example()]).loss
        assert torch.allclose(loaded.loss(images, [example()]).loss, expected, atol=1e-5)


def test_a_saved_smolvlm_checkpoint_loads_as_idefics3(pil_images, tmp_path):
    """SmolVLM(2) has its own model_type and classes but Idefics3's layout and processor."""
    import transformers

    from mmguard.models.lvlm.hf_common import build_tiny

    tiny = create_hf_lvlm("idefics3-tiny")
    config = transformers.SmolVLMConfig(
        vision_config=tiny.model.config.vision_config.to_dict(),
        text_config=tiny.model.config.text_config.to_dict(), scale_factor=2,
        image_token_id=tiny.model.config.image_token_id)
    build_tiny(transformers.SmolVLMForConditionalGeneration, config, 0).save_pretrained(tmp_path)
    processor = transformers.SmolVLMImageProcessor(size={"longest_edge": 64},
                                                   max_image_size={"longest_edge": 32})
    processor.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = create_hf_lvlm(str(tmp_path))
    assert type(loaded.model).__name__ == "SmolVLMForConditionalGeneration"
    image = as_tensor(pil_images[6]).requires_grad_(True)
    loaded.loss([image], [example()]).loss.sum().backward()
    assert image.grad.abs().sum() > 0


def test_registry_lists_and_dispatches_the_families():
    assert set(FAMILIES) <= set(HF_LVLM_MODELS) <= set(lvlm_models())
    assert create_hf_lvlm("not-a-model") is None
