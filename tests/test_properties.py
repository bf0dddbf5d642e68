"""Properties of the box, geometry and pooling operators on inputs hypothesis draws, checked
against the slow references of tests/reference.py (and spp_pool's own reference loop)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sppcli.ops.boxes as boxes_module
import sppcli.ops.spp_pool as spp_module
from sppcli.ops.boxes import DELTA_SIZE_CLAMP, apply_deltas, batched_nms, bbox_deltas, box_iou, nms
from sppcli.ops.geometry import receptive_field, window_to_cells
from sppcli.ops.spp_pool import spp_pool, spp_pool_reference
from tests.reference import iou_loop, loop_nms

# Few examples each: the whole file runs in seconds; the strategies below aim them at the
# edges (touching, nested and zero-area boxes, ties, tiny maps).
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ZF5_LAYERS = [(7, 2, 1), (3, 2, 0), (5, 2, 2), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)]


@st.composite
def integer_boxes(draw, min_count: int = 1, max_count: int = 12, span: int = 20):
    """Boxes on a small integer grid: IoUs are exact in float64, so equality with the loop and
    threshold decisions (IoU exactly at the threshold) are well defined; zero-area boxes included."""
    count = draw(st.integers(min_count, max_count))
    rows = []
    for _ in range(count):
        x1, y1 = draw(st.integers(0, span)), draw(st.integers(0, span))
        rows.append([x1, y1, x1 + draw(st.integers(0, span // 2)), y1 + draw(st.integers(0, span // 2))])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


@st.composite
def positive_boxes(draw, count: int, low: float = -200.0, high: float = 800.0, max_side: float = 60.0):
    rows = []
    for _ in range(count):
        x1 = draw(st.floats(low, high, allow_nan=False))
        y1 = draw(st.floats(low, high, allow_nan=False))
        w = draw(st.floats(1.0, max_side, allow_nan=False))
        h = draw(st.floats(1.0, max_side, allow_nan=False))
        rows.append([x1, y1, x1 + w, y1 + h])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


@contextlib.contextmanager
def patched(module, name: str, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


# --- IoU -------------------------------------------------------------------------------------


@FEW
@given(integer_boxes(), integer_boxes())
def test_iou_is_symmetric_bounded_and_equals_the_loop(a, b):
    ious = box_iou(a, b)
    assert torch.equal(ious, box_iou(b, a).T)
    assert bool(((ious >= 0) & (ious <= 1)).all())
    expected = torch.tensor([[iou_loop(x, y) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    assert torch.equal(ious, expected)


@FEW
@given(integer_boxes())
def test_iou_of_a_box_with_itself_is_one_unless_empty(boxes):
    diagonal = box_iou(boxes, boxes).diagonal()
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    assert torch.equal(diagonal, has_area.double())


# --- NMS -------------------------------------------------------------------------------------


@FEW
@given(integer_boxes(min_count=0, max_count=25), st.data(),
       st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]), st.sampled_from([1, 3, 256]))
def test_nms_equals_the_greedy_loop(boxes, data, threshold, block):
    # Few distinct scores, so ties (broken by index) are common; blocks of 1 and 3 boxes drive
    # the blocked pass's cross-block suppression.
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=len(boxes), max_size=len(boxes))),
                          dtype=torch.float64)
    with patched(boxes_module, "_NMS_BLOCK", block):
        kept = nms(boxes, scores, threshold)
    assert kept.tolist() == loop_nms(boxes, scores, threshold)


@FEW
@given(integer_boxes(min_count=0, max_count=25), st.data(), st.sampled_from([0.3, 0.5]))
def test_batched_nms_equals_the_loop_per_label(boxes, data, threshold):
    n = len(boxes)
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=torch.float64)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=torch.long)
    kept = batched_nms(boxes, scores, labels, threshold)
    expected = []
    for label in range(3):
        members = torch.nonzero(labels == label).flatten()
        expected += [int(members[i]) for i in loop_nms(boxes[members], scores[members], threshold)]
    expected.sort(key=lambda i: (-float(scores[i]), i))
    assert kept.tolist() == expected


# --- box deltas ------------------------------------------------------------------------------


@FEW
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(positive_boxes(n), positive_boxes(n))))
def test_box_deltas_round_trip(pair):
    src, dst = pair
    deltas = bbox_deltas(src, dst)
    # Sides of 1-60 pixels: every size ratio is below the clamp, so decoding is exact up to rounding.
    assert bool((deltas[:, 2:] < DELTA_SIZE_CLAMP).all())
    torch.testing.assert_close(apply_deltas(deltas, src), dst, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bbox_deltas(src, src), torch.zeros_like(deltas), rtol=0, atol=1e-12)


# --- window -> cells -------------------------------------------------------------------------


@st.composite
def boxes_and_larger_edges(draw):
    """A box and the same box with every edge moved right/down by a non-negative amount."""
    count = draw(st.integers(1, 8))
    boxes, moved = [], []
    for _ in range(count):
        x1, y1 = draw(st.floats(-100, 1000)), draw(st.floats(-100, 1000))
        x2, y2 = x1 + draw(st.floats(0, 600)), y1 + draw(st.floats(0, 600))
        dx1, dy1 = draw(st.floats(0, 300)), draw(st.floats(0, 300))
        dx2, dy2 = dx1 + draw(st.floats(0, 300)), dy1 + draw(st.floats(0, 300))  # keeps x1 <= x2
        boxes.append([x1, y1, x2, y2])
        moved.append([x1 + dx1, y1 + dy1, x2 + dx2, y2 + dy2])
    return torch.tensor(boxes, dtype=torch.float64), torch.tensor(moved, dtype=torch.float64)


@FEW
@given(boxes_and_larger_edges(), st.integers(1, 60), st.integers(1, 60))
def test_window_cells_lie_in_the_map_and_are_monotone_in_the_window(pair, height, width):
    boxes, moved = pair
    geometry = receptive_field(ZF5_LAYERS)
    cells = window_to_cells(boxes, geometry, height, width)
    moved_cells = window_to_cells(moved, geometry, height, width)
    for c in (cells, moved_cells):
        x1, y1, x2, y2 = c.unbind(1)
        assert bool(((0 <= x1) & (x1 <= x2) & (x2 < width) & (0 <= y1) & (y1 <= y2) & (y2 < height)).all())
    # Moving any window edge right (down) never moves a cell edge left (up).
    assert bool((moved_cells >= cells).all())


# --- spp_pool --------------------------------------------------------------------------------


@st.composite
def maps_and_windows(draw):
    channels, height, width = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    # Small integers (many ties, signed zeros) or any finite half-precision value.
    values = draw(st.one_of(
        st.lists(st.integers(-2, 2).map(float), min_size=channels * height * width, max_size=channels * height * width),
        st.lists(st.floats(width=16, allow_nan=False, allow_infinity=True),
                 min_size=channels * height * width, max_size=channels * height * width),
    ))
    fmap = torch.tensor(values, dtype=torch.float32).reshape(channels, height, width)
    if draw(st.booleans()):
        fmap.view(-1)[draw(st.integers(0, fmap.numel() - 1))] = float("nan")
    windows = []
    for _ in range(draw(st.integers(1, 12))):
        x1, y1 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        windows.append([x1, y1, draw(st.integers(x1, width - 1)), draw(st.integers(y1, height - 1))])
    if draw(st.booleans()):
        windows += windows[: draw(st.integers(1, len(windows)))]  # repeats
    return fmap, torch.tensor(windows, dtype=torch.long)


@pytest.mark.parametrize("path", ["numba", "torch"])
@FEW
@given(maps_and_windows(), st.sampled_from([(1, 2, 3, 6), (4, 3, 2, 1), (5,), (2, 4, 8), (7, 1)]),
       st.sampled_from([torch.float32, torch.float16]), st.booleans())
def test_spp_pool_equals_its_reference_loop(path, case, levels, dtype, dedup):
    if path == "numba" and spp_module._cpu_kernel() is None:
        pytest.skip("numba is not installed")
    fmap, cells = case
    fmap = fmap.to(dtype)
    expected = spp_pool_reference(fmap, cells, levels)
    with patched(spp_module, "_USE_NUMBA", path == "numba"):
        got = spp_pool(fmap, cells, levels, _dedup=dedup)
    assert got.dtype == dtype and got.shape == expected.shape
    # NaN where the loop has NaN, equal values elsewhere (+0.0 == -0.0: the documented caveat).
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
