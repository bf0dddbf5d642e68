"""Receptive-field geometry, window -> cell mapping and scale choice."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sppcli.ops.geometry import FieldGeometry, best_scale_index, receptive_field, scaled_size, window_to_cells

# (kernel, stride, padding): conv1, pool1, conv2, pool2, conv3, conv4, conv5.
ZF5 = [(7, 2, 1), (3, 2, 0), (5, 2, 2), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
ZF5_RELEASE = [(7, 2, 1), (3, 2, 0), (5, 2, 0), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)]  # conv2 pad 0


def map_length(length: int, layers) -> int:
    for kernel, stride, padding in layers:
        length = (length + 2 * padding - kernel) // stride + 1
    return length


def brute_force_centre(layers, cell: int) -> float:
    """Pixel-index centre of one output cell's receptive field, by walking the index interval
    back through every layer (padding may push it below 0; that is still its centre)."""
    lo = hi = cell
    for kernel, stride, padding in reversed(layers):
        lo, hi = lo * stride - padding, hi * stride - padding + kernel - 1
    return (lo + hi) / 2


def test_zf5_geometry_hand_worked():
    # centre offsets a = sum S_<l * ((k-1)/2 - p):
    # conv1 1*(3-1)=2, pool1 2*(1-0)=2, conv2 4*(2-2)=0, pool2 8*(1-0)=8, conv3-5 16*(1-1)=0
    # -> a = 12 (pixel index), continuous centre 12.5; S = 2*2*2*2 = 16; offset = S/2 = 8.
    assert receptive_field(ZF5) == FieldGeometry(stride=16, offset0=12.5, offset=8.0)


def test_release_zf5_offset0_equals_the_release_value():
    # conv2 without padding adds 4*(2-0)=8: a = 20, continuous 20.5, 1-based pixel index 21,
    # which is the offset0 of the authors' ZF-5 pooling parameters.
    geometry = receptive_field(ZF5_RELEASE)
    assert geometry.stride == 16 and geometry.offset0 - 0.5 + 1 == 21


@pytest.mark.parametrize("seed", range(10))
def test_offset0_is_the_receptive_field_centre_of_every_cell(seed):
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(int(torch.randint(1, 6, (1,), generator=generator))):
        kernel = int(torch.randint(1, 8, (1,), generator=generator))
        stride = int(torch.randint(1, 4, (1,), generator=generator))
        padding = int(torch.randint(0, kernel // 2 + 2, (1,), generator=generator))
        layers.append((kernel, stride, padding))
    geometry = receptive_field(layers)
    assert geometry.stride == math.prod(stride for _, stride, _ in layers)
    for cell in range(4):
        assert geometry.offset0 + geometry.stride * cell == brute_force_centre(layers, cell) + 0.5


def test_receptive_field_rejects_bad_layers():
    with pytest.raises(ValueError):
        receptive_field([])
    with pytest.raises(ValueError):
        receptive_field([(3, 0, 1)])


def release_cells(box, geometry: FieldGeometry, height: int, width: int) -> list[int]:
    """The release's spm_pool_caffe_mex.cpp arithmetic, literally, on 1-based inclusive pixels
    (l = x1 + 1, r = x2) with its 1-based offset0, C integer division, clamp to [1, size];
    converted back to 0-based cells."""
    offset0 = geometry.offset0 - 0.5 + 1
    stride, offset = geometry.stride, geometry.offset
    l, t, r, b = box[0] + 1, box[1] + 1, box[2], box[3]
    x0 = int(math.floor((l - offset0 + offset) / stride + 0.5) + 1)
    y0 = int(math.floor((t - offset0 + offset) / stride + 0.5) + 1)
    x1 = int(math.ceil((r - offset0 - offset) / stride - 0.5) + 1)
    y1 = int(math.ceil((b - offset0 - offset) / stride - 0.5) + 1)
    if x0 > x1:
        x0 = x1 = int((x0 + x1) / 2)  # C division truncates toward zero
    if y0 > y1:
        y0 = y1 = int((y0 + y1) / 2)
    clamp_x = lambda v: min(width, max(1, v))  # noqa: E731
    clamp_y = lambda v: min(height, max(1, v))  # noqa: E731
    return [clamp_x(x0) - 1, clamp_y(y0) - 1, clamp_x(x1) - 1, clamp_y(y1) - 1]


@pytest.mark.parametrize("offset", [None, 6.5])
def test_window_to_cells_matches_the_release_rule(offset):
    geometry = receptive_field(ZF5_RELEASE)
    if offset is not None:
        geometry = dataclasses.replace(geometry, offset=offset)
    generator = torch.Generator().manual_seed(1)
    height, width = 30, 40
    corners = torch.randint(-40, 16 * 40 + 40, (400, 2), generator=generator).double()
    sides = torch.randint(1, 300, (400, 2), generator=generator).double()
    boxes = torch.cat([corners, corners + sides], dim=1)
    got = window_to_cells(boxes, geometry, height, width)
    expected = [release_cells(box, geometry, height, width) for box in boxes.tolist()]
    assert got.dtype == torch.long
    assert got.tolist() == expected


def test_window_to_cells_reduces_to_the_paper_rule():
    # offset0 = 0.5 is pixel index 0 (o0 = 0) and offset = S/2: left cell = floor(x/S) + 1 for
    # the first pixel x, right cell = ceil(x/S) - 1 for the last pixel x.
    geometry = FieldGeometry(stride=16, offset0=0.5, offset=8.0)
    boxes = torch.tensor([[40.0, 33.0, 201.0, 160.0]])  # first pixels 40, 33; last 200, 159
    expected = [40 // 16 + 1, 33 // 16 + 1, math.ceil(200 / 16) - 1, math.ceil(159 / 16) - 1]
    assert window_to_cells(boxes, geometry, 50, 50)[0].tolist() == expected  # [3, 3, 12, 9]


def test_full_image_windows_map_to_the_full_map():
    geometry = receptive_field(ZF5)
    for image_w, image_h in [(688, 917), (917, 688), (480, 640), (1200, 1600), (224, 224)]:
        map_w, map_h = map_length(image_w, ZF5), map_length(image_h, ZF5)
        boxes = torch.tensor([[0.0, 0.0, image_w, image_h]])
        assert window_to_cells(boxes, geometry, map_h, map_w)[0].tolist() == [0, 0, map_w - 1, map_h - 1]


def test_tiny_window_collapses_to_the_midpoint_cell():
    geometry = receptive_field(ZF5)  # S = 16, offset0 = 12.5, offset = 8
    # x: first pixel centre 100.5, last 103.5.
    # left  = floor((100.5 - 12.5 + 8) / 16 + 0.5) = floor(6.5)    = 6
    # right = ceil ((103.5 - 12.5 - 8) / 16 - 0.5) = ceil(4.6875)  = 5
    # left > right -> both floor((6 + 5) / 2) = 5. Same numbers for y.
    boxes = torch.tensor([[100.0, 100.0, 104.0, 104.0]])
    assert window_to_cells(boxes, geometry, 43, 57)[0].tolist() == [5, 5, 5, 5]


def test_window_at_the_map_border_and_outside_the_image_clamp():
    geometry = receptive_field(ZF5)
    height, width = 43, 57
    boxes = torch.tensor([
        [880.0, 0.0, 912.0, 688.0],  # right edge of a 912 x 688 image
        [-300.0, -300.0, -200.0, -200.0],  # entirely left of / above the image
        [2000.0, 2000.0, 2100.0, 2100.0],  # entirely right of / below it
    ])
    cells = window_to_cells(boxes, geometry, height, width).tolist()
    # x: left = floor((880.5 - 12.5 + 8)/16 + 0.5) = floor(55.25) = 55;
    #    right = ceil((911.5 - 12.5 - 8)/16 - 0.5) = ceil(55.1875) = 56 (= width - 1)
    assert cells[0] == [55, 0, 56, 42]
    assert cells[1] == [0, 0, 0, 0]
    assert cells[2] == [56, 42, 56, 42]


def test_window_to_cells_always_valid():
    generator = torch.Generator().manual_seed(7)
    boxes = (torch.rand(500, 4, generator=generator) - 0.2) * 1000
    for height, width in [(1, 1), (3, 7), (43, 57)]:
        cells = window_to_cells(boxes, receptive_field(ZF5), height, width)
        assert (cells[:, 0] >= 0).all() and (cells[:, 1] >= 0).all()
        assert (cells[:, 0] <= cells[:, 2]).all() and (cells[:, 1] <= cells[:, 3]).all()
        assert (cells[:, 2] < width).all() and (cells[:, 3] < height).all()
    assert window_to_cells(torch.zeros(0, 4), receptive_field(ZF5), 5, 5).shape == (0, 4)


def test_best_scale_index_hand_worked():
    # expected factor = sqrt(224*224 / (w*h)): 112x112 -> 2.0, 224x224 -> 1.0, 448x448 -> 0.5,
    # 224x896 -> 0.5, 160x160 -> 1.4 (nearer 1.0 than 2.0).
    boxes = torch.tensor([
        [0.0, 0.0, 112.0, 112.0], [10.0, 10.0, 234.0, 234.0], [0.0, 0.0, 448.0, 448.0],
        [0.0, 0.0, 224.0, 896.0], [0.0, 0.0, 160.0, 160.0],
    ])
    assert best_scale_index(boxes, [0.5, 1.0, 2.0]).tolist() == [2, 1, 0, 0, 1]


def test_best_scale_index_ties_choose_the_earlier_scale_and_tiny_windows_the_largest():
    # 112x112 expects factor 2.0, exactly between 1.0 and 3.0.
    boxes = torch.tensor([[0.0, 0.0, 112.0, 112.0], [5.0, 5.0, 5.0, 5.0]])
    assert best_scale_index(boxes, [1.0, 3.0]).tolist() == [0, 1]


def test_best_scale_index_against_loop():
    generator = torch.Generator().manual_seed(2)
    corners = torch.rand(200, 2, generator=generator, dtype=torch.float64) * 400
    boxes = torch.cat([corners, corners + 1 + torch.rand(200, 2, generator=generator, dtype=torch.float64) * 400], 1)
    factors = [480 / 375, 576 / 375, 688 / 375, 864 / 375, 1200 / 375]
    expected = []
    for x1, y1, x2, y2 in boxes.tolist():
        target = 224 / math.sqrt((x2 - x1) * (y2 - y1))
        distances = [abs(f - target) for f in factors]
        expected.append(distances.index(min(distances)))
    assert best_scale_index(boxes, factors).tolist() == expected


def test_scaled_size_hand_worked():
    # 500 x 375 to short side 688: factor 688/375 = 1.8347; long side 917.33 -> 917 <= 1000.
    assert scaled_size(500, 375, 688, 1000) == (917, 688, pytest.approx(688 / 375))
    # 2000 x 500: 688/500 makes the long side 2752 > 1000, so factor = 1000/2000 = 0.5.
    assert scaled_size(2000, 500, 688, 1000) == (1000, 250, 0.5)
    # 3 x 2 to short side 3: factor 1.5, width 4.5 rounds half up to 5.
    assert scaled_size(3, 2, 3, 100) == (5, 3, 1.5)


def test_window_to_cells_with_a_map_size_per_window():
    geometry = receptive_field([(7, 2, 1), (3, 2, 1), (5, 2, 0), (3, 2, 1), (3, 1, 1)])
    rng = torch.Generator().manual_seed(3)
    boxes = torch.rand(40, 4, generator=rng, dtype=torch.float64) * 300
    boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:]) + 1], dim=1)
    heights = torch.randint(1, 20, (40,), generator=rng)
    widths = torch.randint(1, 20, (40,), generator=rng)
    together = window_to_cells(boxes, geometry, heights, widths)
    for i in range(40):
        alone = window_to_cells(boxes[i:i + 1], geometry, int(heights[i]), int(widths[i]))
        assert together[i].tolist() == alone[0].tolist()
    with pytest.raises(ValueError, match="at least 1 x 1"):
        window_to_cells(boxes[:2], geometry, torch.tensor([3, 0]), torch.tensor([3, 3]))
