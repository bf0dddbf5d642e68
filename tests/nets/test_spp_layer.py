"""Spatial pyramid pooling of whole maps: bin arithmetic, output layout, both binning modes."""

from __future__ import annotations

import math

import pytest
import torch

from sppcli.nets.spp_layer import SpatialPyramidPooling, adaptive_intervals, bin_intervals, bins, paper_window


def test_bins():
    assert bins((6, 3, 2, 1)) == 50
    assert bins((4, 3, 2, 1)) == 30
    assert bins([1]) == 1


@pytest.mark.parametrize(
    ("size", "n", "expected"),
    [
        (13, 6, (3, 2)),  # 224 input, ZF-5: the release's pool5_spm6 is kernel 3 stride 2
        (13, 3, (5, 4)),  # release pool5_spm3: kernel 5 stride 4
        (13, 2, (7, 6)),
        (13, 1, (13, 13)),
        (10, 3, (4, 3)),  # 180 input
        (10, 2, (5, 5)),
        (10, 1, (10, 10)),
        (14, 7, (2, 2)),  # VGG-16 at 224: identical to torchvision's pool5
        (14, 6, (3, 2)),  # 6 windows, the last ends at 13: row 13 is not pooled (paper rule)
        (10, 6, None),  # ceil 2 / floor 1 would give 9 windows
        (15, 6, None),  # window 3, stride 2: 7 windows
        (4, 6, None),  # fewer cells than bins: stride 0
    ],
)
def test_paper_window_hand_cases(size, n, expected):
    assert paper_window(size, n) == expected


def test_paper_window_only_accepts_exact_tilings():
    for size in range(1, 80):
        for n in range(1, 9):
            result = paper_window(size, n)
            window, stride = math.ceil(size / n), size // n
            tiles = stride > 0 and (size - window) // stride + 1 == n
            assert (result is not None) == tiles, (size, n)
            if result is not None:
                assert (n - 1) * stride + window <= size  # every window lies inside the map


def test_intervals():
    assert bin_intervals(13, 6, "paper") == [(0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13)]
    # a=10, n=6 falls back to the adaptive rule [floor(i*a/n), ceil((i+1)*a/n)).
    expected = [(0, 2), (1, 4), (3, 5), (5, 7), (6, 9), (8, 10)]
    assert bin_intervals(10, 6, "paper") == expected == adaptive_intervals(10, 6)
    assert adaptive_intervals(4, 6) == [(0, 1), (0, 2), (1, 2), (2, 3), (2, 4), (3, 4)]
    with pytest.raises(ValueError, match="unknown SPP mode"):
        bin_intervals(10, 6, "caffe")


def _spp_reference(x: torch.Tensor, levels, mode: str) -> torch.Tensor:
    """Triple loop in float64 over the intervals of :func:`bin_intervals`."""
    x = x.to(torch.float64)
    batch, channels, height, width = x.shape
    out = []
    for n in levels:
        rows, cols = bin_intervals(height, n, mode), bin_intervals(width, n, mode)
        level = torch.empty(batch, channels, n, n, dtype=torch.float64)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                level[:, :, i, j] = x[:, :, r0:r1, c0:c1].amax(dim=(2, 3))
        out.append(level.reshape(batch, -1))  # channel-major: c * n * n + i * n + j
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("mode", ["paper", "adaptive"])
@pytest.mark.parametrize(("height", "width"), [(13, 13), (10, 10), (43, 57), (14, 9), (4, 5), (1, 1), (2, 7)])
def test_spp_matches_loop(mode, height, width):
    torch.manual_seed(height * 100 + width)
    x = torch.randn(2, 3, height, width)
    levels = (6, 3, 2, 1)
    got = SpatialPyramidPooling(levels, mode=mode)(x)
    assert got.shape == (2, 3 * 50)
    assert got.dtype == x.dtype
    assert torch.equal(got.double(), _spp_reference(x, levels, mode))


def test_paper_mode_equals_sliding_max_pool_on_13x13():
    torch.manual_seed(3)
    x = torch.randn(1, 4, 13, 13)
    got = SpatialPyramidPooling((6,), mode="paper")(x)
    assert torch.equal(got, torch.nn.functional.max_pool2d(x, 3, 2).flatten(1))


@pytest.mark.parametrize(("map_size", "input_size"), [(13, 224), (10, 180), (42, 688)])
def test_output_length_is_fixed(map_size, input_size):
    spp = SpatialPyramidPooling((6, 3, 2, 1))
    for mode in ("paper", "adaptive"):
        spp.mode = mode
        assert spp(torch.rand(1, 256, map_size, map_size + 5)).shape == (1, 256 * 50) == (1, spp.output_dim(256))


def test_levels_keep_the_given_order():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 11, 8)
    fine_first = SpatialPyramidPooling((6, 3, 2, 1))(x)
    coarse_first = SpatialPyramidPooling((1, 2, 3, 6))(x)
    c = 5
    blocks = {n: fine_first[:, c * offset : c * (offset + n * n)] for n, offset in [(6, 0), (3, 36), (2, 45), (1, 49)]}
    assert torch.equal(coarse_first, torch.cat([blocks[1], blocks[2], blocks[3], blocks[6]], dim=1))
    # The 1x1 level is the global max of each channel.
    assert torch.equal(blocks[1], x.amax(dim=(2, 3)))


def test_gradient_reaches_the_map():
    x = torch.randn(1, 2, 10, 10, requires_grad=True)
    SpatialPyramidPooling((6, 3, 2, 1))(x).sum().backward()  # level 6 uses the fallback path
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="levels"):
        SpatialPyramidPooling(())
    with pytest.raises(ValueError, match="unknown SPP mode"):
        SpatialPyramidPooling((1,), mode="mean")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        SpatialPyramidPooling((1,))(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="too small"):
        SpatialPyramidPooling((1,))(torch.zeros(1, 3, 0, 4))
