"""fc head, the assembled SppNet, and image preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sppcli.nets.heads import FcHead
from sppcli.nets.sppnet import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, SppNet, normalize, preprocess
from sppcli.nets.trunks import ZF5


def test_head_features_are_post_relu_layers():
    torch.manual_seed(0)
    head = FcHead(in_dim=20, hidden=16, dropout=0.5, num_outputs=3).eval()
    pooled = torch.randn(4, 20)
    fc6 = torch.clamp(pooled @ head.fc6.weight.T + head.fc6.bias, min=0)
    fc7 = torch.clamp(fc6 @ head.fc7.weight.T + head.fc7.bias, min=0)
    logits = fc7 @ head.fc8.weight.T + head.fc8.bias
    assert torch.allclose(head.fc6_features(pooled), fc6, atol=1e-6)
    assert torch.allclose(head.fc7_features(pooled), fc7, atol=1e-6)
    assert torch.allclose(head(pooled), logits, atol=1e-6)
    assert head.num_outputs == 3


def test_head_dropout_only_in_training():
    torch.manual_seed(1)
    head = FcHead(in_dim=10, hidden=64, dropout=0.5)
    pooled = torch.rand(2, 10)
    head.train()
    assert not torch.equal(head.fc7_features(pooled), head.fc7_features(pooled))
    head.eval()
    assert torch.equal(head.fc7_features(pooled), head.fc7_features(pooled))


def test_head_without_fc8_returns_fc7_and_new_fc8():
    torch.manual_seed(2)
    head = FcHead(in_dim=10, hidden=8).eval()
    pooled = torch.rand(3, 10)
    assert head.fc8 is None and head.num_outputs is None
    assert torch.equal(head(pooled), head.fc7_features(pooled))
    big = FcHead(in_dim=4, hidden=400)
    fc8 = big.new_fc8(300, std=0.01)
    assert big.fc8 is fc8 and fc8.weight.shape == (300, 400)
    assert abs(fc8.weight.std().item() - 0.01) < 0.0005 and torch.count_nonzero(fc8.bias) == 0
    with pytest.raises(ValueError):
        FcHead(in_dim=4, hidden=8, dropout=1.0)


def test_sppnet_shapes_for_both_training_sizes():
    torch.manual_seed(3)
    trunk = ZF5(width=0.125)
    net = SppNet(trunk, (6, 3, 2, 1), FcHead(trunk.out_channels * 50, hidden=32, num_outputs=7)).eval()
    for size in (224, 180):
        images = torch.randn(2, 3, size, size)
        assert net(images).shape == (2, 7)
        conv5 = net.features(images)
        assert conv5.shape == (2, 32, *trunk.feature_map_size(size, size))
        assert torch.equal(net.pooled(images), net.spp(conv5))
    assert net.levels == (6, 3, 2, 1)


def test_sppnet_checks_head_input_length():
    trunk = ZF5(width=0.125)
    with pytest.raises(ValueError, match=r"gives 1600"):
        SppNet(trunk, (6, 3, 2, 1), FcHead(1000, hidden=8))


def test_preprocess_hand_values():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[0, 1] = (255, 128, 0)  # row 0, column 1, RGB
    tensor = preprocess(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    expected_red = (1.0 - 0.485) / 0.229
    expected_green = (128 / 255 - 0.456) / 0.224
    expected_blue = (0.0 - 0.406) / 0.225
    assert tensor[:, 0, 1].tolist() == pytest.approx([expected_red, expected_green, expected_blue], rel=1e-6)
    assert tensor[:, 1, 2].tolist() == pytest.approx([-m / s for m, s in zip(IMAGENET_MEAN_RGB, IMAGENET_STD_RGB)])
    # the method on the net is the same single implementation
    assert torch.equal(SppNet.preprocess(image), tensor)


def test_normalize_batch_matches_preprocess():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert torch.allclose(normalize(batch), torch.stack([preprocess(im) for im in images]))


def test_preprocess_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        preprocess(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        normalize(torch.zeros(1, 4, 5, 5))
