"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

A SigLIP ViT, a connector (pixel shuffle + linear: the projector) and a
Llama-type LM (SmolLM2 in SmolVLM). SmolVLM's image processor and prompt
format are Idefics3's.

Image processor: `Idefics3ImageProcessor` / `SmolVLMImageProcessor`,
torchvision backend (the default; with torchvision >= 0.27 it resizes with
Lanczos on a CPU, while on a GPU torchvision falls back to bicubic, which is not
what this adapter reproduces): the longest edge resized to `size` (the other
rounded up to even), then with `do_image_splitting` resized up to multiples of
`max_image_size`, cut into tiles of that size (row-major) plus the whole image
resized to one tile (the global image, last); without splitting, resized to one
square tile. Rescale, normalise (mean = std = 0.5), zero-pad every sample to the
batch's largest number of tiles (`pixel_values` (B, tiles, 3, S, S) and
`pixel_attention_mask`). Each tile gives `image_seq_len` tokens: the pixel
shuffle joins each scale_factor x scale_factor block of patches into one, in
row-major order, so a token covers a (patch_size * scale_factor)**2 square of
its tile, and the global image's tokens a square of that downscaled copy (its
change is measured in those pixels, the ones the token sees).

Prompt format: `<|im_start|>User:{image}{prompt}<end_of_utterance>\\nAssistant: {response}
<end_of_utterance>` where an unsplit image is
`<fake_token_around_image><global-img><image>...<fake_token_around_image>` and a split
one is, per row, `<fake_token_around_image><row_r_col_c><image>...` for every column then
`\\n`, followed by `\\n` and the global image as above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.base import IMAGE, TEMPLATE, PixelInputs, Segment
from mmguard.models.lvlm.hf_common import (
    HFAdapter,
    TokenRegions,
    block_labels,
    build_tiny,
    normalize,
    response_segment,
    tiny_llama_config,
    tiny_tokenizer,
    torch_resize,
)

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"


class ImageTokens(int):
    """An image-token count that remembers the tile grid it comes from.

    The prompt text of a split image depends on its rows and columns, which
    the count alone does not give; `pixel_inputs` returns these counts in
    `tokens_per_image`, and `template` reads the grid back from them.
    """

    rows: int
    cols: int

    def __new__(cls, count: int, rows: int, cols: int) -> ImageTokens:
        value = super().__new__(cls, count)
        value.rows, value.cols = rows, cols
        return value


class Idefics3Adapter(HFAdapter):
    """The LVLM contract for Idefics3 / SmolVLM checkpoints (and `idefics3-tiny`).

    Example:
        adapter = create_lvlm("HuggingFaceTB/SmolVLM-256M-Instruct")
        out = adapter.loss([image], [TextExample("What is this?", "a sneaker")])
    """

    end_of_turn = END_OF_UTTERANCE

    def __init__(self, name: str, model: nn.Module, tokenizer, image_processor):
        super().__init__(name, model, tokenizer, image_processor)
        config = model.config
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        vision = config.vision_config
        self.image_seq_len = int((vision.image_size // vision.patch_size) ** 2
                                 / config.scale_factor ** 2)

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    def projector(self) -> nn.Module:
        return self.model.model.connector

    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    # -- the image processor ---------------------------------------------------
    def pixel_inputs(self, images: Sequence[torch.Tensor]) -> PixelInputs:
        from transformers.models.idefics3.image_processing_idefics3 import (
            get_resize_output_image_size,
        )

        processor = self.image_processor
        filter_name, mean, std = self._pixel_settings()
        tile = processor.max_image_size["longest_edge"]
        samples, counts = [], []
        for image in images:
            x = image[None]
            height, width = x.shape[-2:]
            if processor.do_resize:
                height, width = get_resize_output_image_size(x, processor.size.longest_edge)
            x = torch_resize(x, height, width, filter_name)
            rows = cols = 0
            if processor.do_image_splitting:
                height, width = _vision_encoder_size(height, width, tile)
                x = torch_resize(x, height, width, filter_name)
                if height > tile or width > tile:
                    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
                    frames = [x[..., r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                              for r in range(rows) for c in range(cols)]
                    frames.append(torch_resize(x, tile, tile, filter_name))
                else:
                    frames = [x]
            else:
                frames = [torch_resize(x, tile, tile, filter_name)]
            samples.append([normalize(frame[0], mean, std) for frame in frames])
            counts.append(ImageTokens(self.image_seq_len * len(frames), rows, cols))
        return self.pixels_to_device(_pad_tiles(samples), counts)

    def token_regions(self, pixels: PixelInputs) -> list[TokenRegions]:
        """Each sample's real tiles in sequence order (row-major, the global image last),
        `image_seq_len` tokens each: the connector's pixel shuffle joins each
        scale_factor x scale_factor block of the tile's patches, row-major. The zero
        tiles that pad a sample to the batch's most tiles (the model drops them) cover
        nothing."""
        values = pixels.tensors["pixel_values"]  # (B, tiles, 3, S, S)
        block = self.model.config.vision_config.patch_size * self.model.config.scale_factor
        tile = block_labels(values.shape[-2], values.shape[-1], block)
        per_tile = int(tile.max()) + 1
        regions = []
        for sample, count in enumerate(pixels.tokens_per_image):
            tiles = count // self.image_seq_len
            labels = torch.full((values.shape[1], 1, *tile.shape), -1, dtype=torch.long)
            for index in range(tiles):
                labels[index, 0] = torch.where(tile >= 0, tile + index * per_tile, -1)
            regions.append(TokenRegions(sample, labels, tiles * per_tile))
        return regions

    # -- text ------------------------------------------------------------------
    def template(self, prompt: list[Segment], image_tokens: int,
                 response: str | None) -> list[Segment]:
        segments = [("<|im_start|>User:", TEMPLATE), *self._image_segments(image_tokens),
                    *prompt, (f"{END_OF_UTTERANCE}\nAssistant:", TEMPLATE)]
        if response is not None:
            segments.append(response_segment(response, self.end_of_turn, space=True))
        return segments

    def _image_segments(self, image_tokens: int) -> list[Segment]:
        rows, cols = self._grid(image_tokens)
        tile = self.image_token * self.image_seq_len
        segments: list[Segment] = []
        for row in range(rows):
            for col in range(cols):
                segments += [(f"{FAKE_TOKEN}<row_{row + 1}_col_{col + 1}>", TEMPLATE),
                             (tile, IMAGE)]
            segments.append(("\n", TEMPLATE))
        return segments + [(("\n" if rows else "") + FAKE_TOKEN + GLOBAL_TOKEN, TEMPLATE),
                           (tile, IMAGE), (FAKE_TOKEN, TEMPLATE)]

    def _grid(self, image_tokens: int) -> tuple[int, int]:
        if isinstance(image_tokens, ImageTokens):
            return image_tokens.rows, image_tokens.cols
        if image_tokens == self.image_seq_len:
            return 0, 0
        tiles = image_tokens // self.image_seq_len - 1
        side = math.isqrt(max(tiles, 0))
        # 1x2 and 2x1 tiles need the same count but not the same text; squares are unambiguous.
        if tiles <= 0 or side * side != tiles or image_tokens % self.image_seq_len:
            raise MMGuardError(f"{self.name}: {image_tokens} image tokens is no tile grid; pass "
                               f"the counts of pixel_inputs, which carry the grid")
        return side, side


def _vision_encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """`Idefics3ImageProcessor.resize_for_vision_encoder`: both sides up to multiples of a tile."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def _pad_tiles(samples: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Zero-pad tiles to the largest size and samples to the most tiles, with the pixel mask."""
    count = max(len(tiles) for tiles in samples)
    height = max(tile.shape[-2] for tiles in samples for tile in tiles)
    width = max(tile.shape[-1] for tiles in samples for tile in tiles)
    values, masks = [], []
    for tiles in samples:
        padded, mask = [], torch.zeros(count, height, width, dtype=torch.long)
        for index, tile in enumerate(tiles):
            padded.append(F.pad(tile, (0, width - tile.shape[-1], 0, height - tile.shape[-2])))
            mask[index, :tile.shape[-2], :tile.shape[-1]] = 1
        padded += [torch.zeros_like(padded[0])] * (count - len(tiles))
        values.append(torch.stack(padded))
        masks.append(mask)
    return {"pixel_values": torch.stack(values), "pixel_attention_mask": torch.stack(masks)}


def tiny_idefics3(seed: int = 0) -> Idefics3Adapter:
    """`idefics3-tiny`: a random SigLIP-type ViT (32 px tiles, 8 px patches, pixel shuffle 2:
    4 tokens per tile), the real connector and a two-layer random Llama with SmolLM2's
    tokenizer plus the Idefics3 tokens. Image splitting is on, as in SmolVLM: a 64 px image
    becomes 2x2 tiles plus the global image (20 image tokens)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
    )

    grid_tokens = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = tiny_tokenizer([FAKE_TOKEN, "<image>", GLOBAL_TOKEN, END_OF_UTTERANCE,
                                *grid_tokens])
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    text = {**tiny_llama_config(len(tokenizer)), "pad_token_id": tokenizer.pad_token_id}
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    processor = Idefics3ImageProcessor(size={"longest_edge": 64},
                                       max_image_size={"longest_edge": 32})
    return Idefics3Adapter("idefics3-tiny",
                           build_tiny(Idefics3ForConditionalGeneration, config, seed),
                           tokenizer, processor)
