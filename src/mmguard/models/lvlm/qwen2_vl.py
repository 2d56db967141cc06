"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration` and its Qwen2_5_VL twin).

A native-resolution ViT whose `merger` (the projector) fuses each 2x2 block of
patches into one language-model token, and a Qwen2 LM with multimodal RoPE.

Image processor: `Qwen2VLImageProcessor` (both versions), torchvision backend
(the one `AutoProcessor` loads): `smart_resize` to multiples of
patch_size * merge_size with min_pixels <= H * W <= max_pixels, bicubic,
rescale, OpenAI CLIP normalisation, then each patch repeated over the
temporal_patch_size frames of a still image and flattened into
`pixel_values` (patches, 3 * T * P * P) with `image_grid_thw` = (1, H / P, W / P).
An image gives (H / P) * (W / P) / merge_size**2 tokens: the merger views each
run of merge_size**2 consecutive patches (one merge block, as `patchify` orders
them) as one token, so token t covers rows t * merge_size**2 to
(t + 1) * merge_size**2 - 1 of the image's `pixel_values`, a (merge_size * P)**2
square of the resized image
(Qwen2.5-VL's windowed attention reorders the blocks and restores their order
after the merger).

Chat template (Qwen2-VL-Instruct, default system prompt included):
`<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
<|vision_start|><|image_pad|>...<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n
{response}<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmguard.models.lvlm.base import IMAGE, TEMPLATE, EncodedBatch, PixelInputs, Segment
from mmguard.models.lvlm.hf_common import (
    HFAdapter,
    TokenRegions,
    build_tiny,
    normalize,
    response_segment,
    tiny_tokenizer,
    torch_resize,
)

SYSTEM_PROMPT = "You are a helpful assistant."
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


class Qwen2VLAdapter(HFAdapter):
    """The LVLM contract for Qwen2-VL / Qwen2.5-VL checkpoints (and `qwen2-vl-tiny`).

    Example:
        adapter = create_lvlm("Qwen/Qwen2-VL-2B-Instruct", device="cuda")
        out = adapter.loss([image], [TextExample("What is this?", "a sneaker")])
    """

    end_of_turn = "<|im_end|>"

    def __init__(self, name: str, model: nn.Module, tokenizer, image_processor):
        super().__init__(name, model, tokenizer, image_processor)
        config = model.config
        self.image_token_id = config.image_token_id
        self.image_token, self.vision_start, self.vision_end = tokenizer.convert_ids_to_tokens(
            [config.image_token_id, config.vision_start_token_id, config.vision_end_token_id])

    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def model_inputs(self, batch: EncodedBatch, pixels: PixelInputs) -> dict[str, torch.Tensor]:
        # M-RoPE gives image tokens 2-D positions; the model finds them by modality type.
        types = (batch.input_ids == self.image_token_id).int()
        return {**super().model_inputs(batch, pixels), "mm_token_type_ids": types}

    # -- the image processor ---------------------------------------------------
    def pixel_inputs(self, images: Sequence[torch.Tensor]) -> PixelInputs:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        processor = self.image_processor
        filter_name, mean, std = self._pixel_settings()
        patch, merge = processor.patch_size, processor.merge_size
        patches, grids, tokens = [], [], []
        for image in images:
            height, width = image.shape[-2:]
            if processor.do_resize:
                height, width = smart_resize(height, width, factor=patch * merge,
                                             min_pixels=processor.size.shortest_edge,
                                             max_pixels=processor.size.longest_edge)
            x = normalize(torch_resize(image[None], height, width, filter_name)[0], mean, std)
            patches.append(_patchify(x, patch, merge, processor.temporal_patch_size))
            grids.append([1, height // patch, width // patch])
            tokens.append((height // patch) * (width // patch) // merge ** 2)
        tensors = {"pixel_values": torch.cat(patches),
                   "image_grid_thw": torch.tensor(grids, dtype=torch.long)}
        return self.pixels_to_device(tensors, tokens)

    def token_regions(self, pixels: PixelInputs) -> list[TokenRegions]:
        """Each image's rows of the flattened `pixel_values`, merge**2 consecutive rows
        (one merge block of patches, all channels and temporal copies) per token: the
        merger's `view(-1, hidden * merge**2)` joins exactly these."""
        merge = self.model.config.vision_config.spatial_merge_size
        regions, start = [], 0
        for frames, rows, cols in pixels.tensors["image_grid_thw"].tolist():
            patches = frames * rows * cols
            labels = (torch.arange(patches) // merge ** 2)[:, None]
            regions.append(TokenRegions(slice(start, start + patches), labels,
                                        patches // merge ** 2))
            start += patches
        return regions

    # -- text ------------------------------------------------------------------
    def template(self, prompt: list[Segment], image_tokens: int,
                 response: str | None) -> list[Segment]:
        segments = [(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                     f"{self.vision_start}", TEMPLATE),
                    (self.image_token * image_tokens, IMAGE), (self.vision_end, TEMPLATE),
                    *prompt, ("<|im_end|>\n<|im_start|>assistant\n", TEMPLATE)]
        if response is not None:
            segments.append(response_segment(response, self.end_of_turn, space=False))
        return segments


def _patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(3, H, W) -> (H/P * W/P, 3 * T * P * P), in `Qwen2VLImageProcessor.patchify`'s order:
    merge blocks row-major, patches inside a block row-major, a still image repeated T times."""
    channels, height, width = image.shape
    grid_h, grid_w = height // patch, width // patch
    x = image.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, P, P)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(grid_h * grid_w, channels * temporal * patch * patch)


# The vision towers differ between versions: Qwen2-VL's blocks are ViT blocks with a GELU
# MLP; Qwen2.5-VL's use RMSNorm, a SwiGLU MLP and windowed attention except in some blocks.
_TINY_VISION = {
    "2": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
    "2.5": {"depth": 2, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64,
            "num_heads": 2, "window_size": 56, "fullatt_block_indexes": [1]},
}


def tiny_qwen2_vl(seed: int = 0, version: str = "2") -> Qwen2VLAdapter:
    """`qwen2-vl-tiny` / `qwen2.5-vl-tiny`: a random two-block vision tower (14 px patches,
    2x2 merge) and a two-layer random Qwen2 LM with SmolLM2's tokenizer plus the vision
    tokens; images are resized to at most 84x84 px (a 64 px image: 4 image tokens)."""
    import transformers

    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    tokenizer = tiny_tokenizer([*VISION_TOKENS, "<|video_pad|>"])
    start, pad, end, video = tokenizer.convert_tokens_to_ids([*VISION_TOKENS, "<|video_pad|>"])
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3]}}
    vision = {**_TINY_VISION[version], "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision, image_token_id=pad, video_token_id=video,
        vision_start_token_id=start, vision_end_token_id=end)
    model = build_tiny(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, seed)
    processor = transformers.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=84 * 84)
    return Qwen2VLAdapter(f"qwen{version}-vl-tiny", model, tokenizer, processor)
