"""Box operators against float64 python loops and hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

import sppcli.ops.boxes as boxes_module
from sppcli.ops.boxes import (
    DELTA_SIZE_CLAMP,
    apply_deltas,
    batched_nms,
    bbox_deltas,
    box_area,
    box_iou,
    clip_boxes,
    nms,
)
from tests.reference import iou_loop, loop_nms


def random_boxes(n: int, generator: torch.Generator, size: float = 100.0) -> torch.Tensor:
    corners = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    sides = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size / 2
    return torch.cat([corners, corners + sides], dim=1)


def test_box_area_hand_worked():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    assert box_area(boxes).tolist() == [6.0, 0.0]


def test_box_iou_matches_voc_plus_one_convention():
    # VOC 1-based inclusive boxes (1,1,2,2) and (2,2,3,3): devkit IoU = 1*1 / (4 + 4 - 1) = 1/7.
    # Internal continuous boxes: (0,0,2,2) and (1,1,3,3): intersection [1,2]x[1,2] = 1.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert box_iou(a, b).item() == pytest.approx(1 / 7)


def test_box_iou_against_loop_including_degenerate_boxes():
    generator = torch.Generator().manual_seed(0)
    a = random_boxes(30, generator)
    b = torch.cat([random_boxes(20, generator), a[:5], torch.tensor([[5.0, 5.0, 5.0, 9.0], [3.0, 3.0, 3.0, 3.0]])])
    a = torch.cat([a, torch.tensor([[3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)])
    got = box_iou(a, b)
    expected = torch.tensor([[iou_loop(x, y) for y in b.tolist()] for x in a.tolist()], dtype=torch.float64)
    assert got.shape == (31, 27)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert not torch.isnan(got).any()
    assert got[-1, -1].item() == 0.0  # two identical zero-area boxes: union 0 -> IoU 0


def test_box_iou_keeps_float32():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float32)
    assert box_iou(boxes, boxes).dtype == torch.float32
    assert box_iou(boxes, boxes).item() == 1.0


@pytest.mark.parametrize("block", [1, 7, 256])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7])
def test_nms_matches_greedy_loop_on_random_boxes(monkeypatch, threshold, block):
    # Blocks of 1 and 7 boxes exercise the cross-block suppression of the blocked greedy pass.
    monkeypatch.setattr(boxes_module, "_NMS_BLOCK", block)
    for seed in range(25):
        generator = torch.Generator().manual_seed(seed)
        boxes = random_boxes(60, generator)
        # Identical boxes and tied scores on purpose: scores quantised to 5 values.
        boxes[10:15] = boxes[0]
        scores = torch.randint(0, 5, (60,), generator=generator).double()
        expected = loop_nms(boxes, scores, threshold)
        assert nms(boxes, scores, threshold).tolist() == expected, f"seed {seed}"
        assert nms(boxes.float(), scores.float(), threshold).tolist() == expected, f"seed {seed} float32"


def test_nms_suppresses_only_strictly_above_threshold():
    # (0,0,2,1) and (0,0,1,1): intersection 1, union 2 -> IoU exactly 0.5.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_ties_keep_the_earlier_index():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.3).tolist() == [0, 3]


def test_nms_never_suppresses_zero_area_boxes_and_handles_empty_input():
    boxes = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert nms(boxes, torch.tensor([1.0, 2.0]), 0.0).tolist() == [1, 0]
    kept = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert kept.dtype == torch.long and kept.shape == (0,)


@pytest.mark.parametrize("block", [5, 256])
def test_batched_nms_matches_per_label_loop(monkeypatch, block):
    monkeypatch.setattr(boxes_module, "_NMS_BLOCK", block)
    for seed in range(15):
        generator = torch.Generator().manual_seed(100 + seed)
        boxes = random_boxes(80, generator)
        scores = torch.randint(0, 6, (80,), generator=generator).double()
        labels = torch.randint(0, 4, (80,), generator=generator)
        kept = []
        for label in labels.unique().tolist():
            members = (labels == label).nonzero().squeeze(1)
            kept += [members[i].item() for i in loop_nms(boxes[members], scores[members], 0.3)]
        expected = sorted(kept, key=lambda i: (-scores[i].item(), i))
        assert batched_nms(boxes, scores, labels, 0.3).tolist() == expected, f"seed {seed}"


def test_bbox_deltas_hand_worked():
    # src centre (5, 5), size 10 x 10; dst centre (10, 10), size 10 x 20.
    # dx = (10 - 5) / 10 = 0.5, dy = 0.5, dw = log(10 / 10) = 0, dh = log(20 / 10).
    src = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    dst = torch.tensor([[5.0, 0.0, 15.0, 20.0]], dtype=torch.float64)
    assert bbox_deltas(src, dst)[0].tolist() == pytest.approx([0.5, 0.5, 0.0, math.log(2.0)])


def test_bbox_deltas_against_loop_and_round_trip():
    generator = torch.Generator().manual_seed(3)
    src, dst = random_boxes(50, generator) + 0.5, random_boxes(50, generator) + 0.5
    expected = []
    for s, d in zip(src.tolist(), dst.tolist()):
        sw, sh, dw, dh = s[2] - s[0], s[3] - s[1], d[2] - d[0], d[3] - d[1]
        expected.append([
            (d[0] + dw / 2 - s[0] - sw / 2) / sw, (d[1] + dh / 2 - s[1] - sh / 2) / sh,
            math.log(dw / sw), math.log(dh / sh),
        ])
    deltas = bbox_deltas(src, dst)
    assert torch.allclose(deltas, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(apply_deltas(deltas, src), dst, rtol=0, atol=1e-9)
    deltas32 = bbox_deltas(src.float(), dst.float())
    assert deltas32.dtype == torch.float32
    assert torch.allclose(apply_deltas(deltas32, src.float()), dst.float(), rtol=0, atol=1e-3)


def test_apply_deltas_clamps_size_growth():
    src = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    deltas = torch.tensor([[0.0, 0.0, 100.0, DELTA_SIZE_CLAMP]], dtype=torch.float64)
    out = apply_deltas(deltas, src)
    # Both sides grow by exactly 1000/16: 16 -> 1000, centred on 8.
    assert out[0].tolist() == pytest.approx([8 - 500, 8 - 500, 8 + 500, 8 + 500])
    assert torch.isfinite(out).all()


def test_clip_boxes_uses_continuous_image_bounds():
    boxes = torch.tensor([[-5.0, -1.0, 120.0, 40.0], [10.0, 20.0, 30.0, 90.0]])
    assert clip_boxes(boxes, width=100, height=50).tolist() == [[0.0, 0.0, 100.0, 40.0], [10.0, 20.0, 30.0, 50.0]]
