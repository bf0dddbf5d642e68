"""Conv trunks: map sizes, channel widths, layer geometry, the within-channel LRN."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sppcli.nets.receptive_field import feature_map_size, layer_specs
from sppcli.nets.trunks import ZF5, AlexNetTrunk, VGG16Trunk, WithinChannelLRN, build_trunk, scale_channels
from sppcli.ops.geometry import receptive_field


@pytest.fixture(scope="module")
def thin_zf5() -> ZF5:
    # Map sizes do not depend on the channel counts, so a thin net keeps the big inputs cheap.
    torch.manual_seed(0)
    return ZF5(width=0.125).eval()


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (224, 224, (13, 13)),  # paper section 2.3 / the release's pool5_spm* layers are sized for 13x13
        (180, 180, (10, 10)),  # paper section 2.3: "a x a = 10 x 10" for the 180-network
        (688, 917, (42, 56)),  # one-scale detection input, min side 688 (VOC aspect 4:3-ish)
    ],
)
def test_zf5_conv5_size(thin_zf5, height, width, expected):
    with torch.no_grad():
        conv5 = thin_zf5(torch.zeros(1, 3, height, width))
    assert tuple(conv5.shape[-2:]) == expected
    assert thin_zf5.feature_map_size(height, width) == expected


@pytest.mark.parametrize("name", ["zf5", "alexnet", "vgg16"])
def test_feature_map_size_matches_forward(name):
    trunk = build_trunk(name, width=0.125).eval()
    for height, width in [(37, 64), (64, 37), (95, 96), (97, 130), (131, 77)]:
        with torch.no_grad():
            out = trunk(torch.zeros(1, 3, height, width))
        assert feature_map_size(trunk, height, width) == tuple(out.shape[-2:]), (name, height, width)


def test_feature_map_size_counts_ceil_mode_edge_case():
    # ceil_mode would give a 3rd window starting in the padding; torch drops it (2 outputs).
    pool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1, ceil_mode=True)
    assert feature_map_size(pool, 3, 3) == tuple(pool(torch.zeros(1, 1, 3, 3)).shape[-2:]) == (2, 2)


def test_width_multiplier_channels():
    convs = [m.out_channels for m in ZF5(width=0.25).modules() if isinstance(m, nn.Conv2d)]
    assert convs == [24, 64, 96, 96, 64]
    assert ZF5(width=0.25).out_channels == 64
    assert [m.out_channels for m in ZF5().modules() if isinstance(m, nn.Conv2d)] == [96, 256, 384, 384, 256]
    assert scale_channels(96, 0.01) == 8
    assert scale_channels(10, 0.85) == 9  # 8.5 rounds half up
    with pytest.raises(ValueError, match="width"):
        scale_channels(96, 0.0)


def test_zf5_layer_specs_follow_the_release():
    # Zeiler_conv5.prototxt: conv1 7/2 pad 1, pool1 3/2, conv2 5/2 pad 0, pool2 3/2, conv3-5 3/1 pad 1.
    expected = [(7, 2, 1), (3, 2, 0), (5, 2, 0), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    assert layer_specs(ZF5(width=0.125)) == expected


def test_geometry_derived_from_layers():
    zf5 = ZF5(width=0.125).geometry
    assert zf5.stride == 16
    # Cell 0 is centred on pixel index 20 (21 in the release's 1-based indices, its offset0).
    assert zf5.offset0 == pytest.approx(20.5)
    assert zf5 == receptive_field(layer_specs(ZF5(width=0.125)))
    assert AlexNetTrunk(width=0.125).geometry.stride == 16
    assert VGG16Trunk(width=0.125).geometry.stride == 16
    assert dataclasses.is_dataclass(zf5)


def test_layer_specs_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="no fixed kernel"):
        layer_specs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(2)))
    with pytest.raises(ValueError, match="not square"):
        layer_specs(nn.Sequential(nn.Conv2d(3, 4, (3, 5))))
    with pytest.raises(ValueError, match="dilat"):
        layer_specs(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)))
    with pytest.raises(ValueError, match="unknown layer"):
        layer_specs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.PixelShuffle(2)))
    # Size-preserving layers are skipped; MaxPool2d's default stride is its kernel.
    chain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    assert layer_specs(chain) == [(3, 1, 1), (2, 2, 0)]


def _lrn_reference(x: torch.Tensor, size: int, alpha: float, beta: float) -> torch.Tensor:
    x = x.to(torch.float64)
    out = torch.empty_like(x)
    _, channels, height, width = x.shape
    half = size // 2
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                window = x[0, c, max(0, i - half) : i + half + 1, max(0, j - half) : j + half + 1]
                mean_square = (window**2).sum() / (size * size)  # Caffe divides by size^2 at borders too
                out[0, c, i, j] = x[0, c, i, j] / (1 + alpha * mean_square) ** beta
    return out


def test_within_channel_lrn_matches_loop():
    torch.manual_seed(1)
    x = torch.randn(1, 3, 5, 6) * 40  # large values so the normalisation is far from identity
    for size, alpha, beta in [(3, 5e-5, 0.75), (5, 1e-3, 0.5)]:
        got = WithinChannelLRN(size, alpha, beta)(x)
        assert torch.allclose(got.double(), _lrn_reference(x, size, alpha, beta), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        WithinChannelLRN(size=4)


def test_within_channel_lrn_trains_like_the_power_formula():
    torch.manual_seed(3)
    x = (torch.randn(2, 4, 7, 9) * 40).requires_grad_()
    lrn = WithinChannelLRN(3, 5e-5, 0.75)
    y = lrn(x)
    with torch.no_grad():
        assert torch.equal(lrn(x.detach()), y.detach())  # the in-place inference path: same values
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    z = x.detach().double().requires_grad_()
    mean_square = torch.nn.functional.avg_pool2d(z * z, 3, stride=1, padding=1, count_include_pad=True)
    (z / (1 + 5e-5 * mean_square) ** 0.75 * weights.double()).sum().backward()
    assert torch.allclose(x.grad.double(), z.grad, rtol=1e-5, atol=1e-6)


def test_trunk_output_is_relu():
    torch.manual_seed(2)
    for name in ("zf5", "alexnet", "vgg16"):
        with torch.no_grad():
            out = build_trunk(name, width=0.125)(torch.randn(1, 3, 64, 64))
        assert out.min() >= 0 and out.max() > 0, name


def test_unknown_trunk_names_known_ones():
    with pytest.raises(ValueError, match="zf5, alexnet, vgg16"):
        build_trunk("resnet50")


def test_feature_map_size_reports_collapse(thin_zf5):
    assert thin_zf5.feature_map_size(20, 200) == (0, 11)
    with pytest.raises(RuntimeError):
        thin_zf5(torch.zeros(1, 3, 20, 200))
