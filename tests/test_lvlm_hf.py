"""Hugging Face LVLM adapters on tiny random configs of the real classes (CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmguard.data.builtin import load_builtin
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
