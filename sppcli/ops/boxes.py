"""Box operators: area, IoU, greedy NMS, R-CNN regression deltas, clipping.

Box convention (the project's internal one): float boxes ``(x1, y1, x2, y2)`` in 0-based
*continuous pixel-edge* coordinates. Pixel column ``i`` covers ``[i, i + 1)``, so a box's width
is ``x2 - x1`` and the box covering a whole ``W x H`` image is ``(0, 0, W, H)``. An IoU computed
here equals the VOC devkit's "+1" IoU of the same boxes in VOC's 1-based inclusive pixels.

Every function accepts tensors on any device, in float32 or float64 (float16/bfloat16 boxes are
computed in float32), and returns its result on the input's device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DELTA_SIZE_CLAMP",
    "apply_deltas",
    "batched_nms",
    "bbox_deltas",
    "box_area",
    "box_iou",
    "clip_boxes",
    "nms",
    "paired_iou",
]

#: Largest ``dw``/``dh`` that :func:`apply_deltas` exponentiates: a box can grow at most 1000/16
#: times per axis, which keeps ``exp`` finite for any regressor output (Detectron's bound).
DELTA_SIZE_CLAMP = math.log(1000.0 / 16)

# Boxes (in score order) decided together by the blocked greedy NMS pass; each block costs
# one small IoU matrix plus one (kept x later alive boxes) IoU matrix.
_NMS_BLOCK = 256


def _as_float(boxes: Tensor) -> Tensor:
    if boxes.dtype in (torch.float32, torch.float64):
        return boxes
    return boxes.float()


def _check_boxes(boxes: Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``, continuous pixel-edge coordinates,
            ``x1 <= x2`` and ``y1 <= y2``.

    Returns:
        Tensor[N]: ``(x2 - x1) * (y2 - y1)``, same dtype as ``boxes`` (float16 -> float32).
    """
    _check_boxes(boxes, "boxes")
    boxes = _as_float(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection-over-union.

    Args:
        a (Tensor[N, 4]), b (Tensor[M, 4]): ``(x1, y1, x2, y2)`` continuous pixel-edge boxes.

    Returns:
        Tensor[N, M]: IoU of every pair. A pair whose union is empty (two zero-area boxes) has
        IoU 0, never NaN; a zero-area box has IoU 0 with everything. Boxes with ``x2 < x1`` (or
        ``y2 < y1``) are treated as empty.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    a, b = _as_float(a), _as_float(b)
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    # Clamped sides make malformed boxes empty instead of giving negative areas.
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    # In-place arithmetic on the [N, M] temporaries: NMS calls this on thousands of boxes.
    inter = torch.minimum(a[:, None, 2], b[None, :, 2])
    inter.sub_(torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_(min=0)
    height = torch.minimum(a[:, None, 3], b[None, :, 3])
    height.sub_(torch.maximum(a[:, None, 1], b[None, :, 1])).clamp_(min=0)
    inter.mul_(height)
    union = height.copy_(area_a[:, None]).add_(area_b[None, :]).sub_(inter)
    # An empty union implies an empty intersection; dividing by 1 there yields 0, not NaN.
    union.masked_fill_(union == 0, 1)
    return inter.div_(union)


def _overlaps(boxes_a: Tensor, boxes_b: Tensor, labels_a: Tensor | None, labels_b: Tensor | None,
              iou_threshold: float) -> np.ndarray:
    """bool numpy ``[A, B]``: IoU > threshold (and, with labels, the same label)."""
    over = box_iou(boxes_a, boxes_b) > iou_threshold
    if labels_a is not None:
        over &= labels_a[:, None] == labels_b[None, :]
    return over.cpu().numpy()


def _greedy_nms(boxes: Tensor, scores: Tensor, labels: Tensor | None, iou_threshold: float) -> Tensor:
    if boxes.shape[0] != scores.shape[0] or scores.dim() != 1:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {tuple(scores.shape)}")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Stable sort: among equal scores the box with the smaller index comes first and wins.
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    labels = None if labels is None else labels[order]
    # Blocked greedy pass over the score order. Within a block the greedy choice is made on the
    # block's own small IoU matrix; the block's kept boxes then suppress every later box still
    # alive in one vectorised IoU computation. Total work is about (kept x alive) pairs instead
    # of N^2, and every decision is the one the plain sequential greedy loop makes.
    removed = np.zeros(n, dtype=bool)
    kept: list[np.ndarray] = []
    for start in range(0, n, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, n)
        alive = np.flatnonzero(~removed[start:stop]) + start
        if alive.size == 0:
            continue
        alive_t = torch.from_numpy(alive).to(boxes.device)
        block_labels = None if labels is None else labels[alive_t]
        within = _overlaps(boxes[alive_t], boxes[alive_t], block_labels, block_labels, iou_threshold)
        suppressed = np.zeros(alive.size, dtype=bool)
        block_kept = []
        for i in range(alive.size):
            if suppressed[i]:
                continue
            block_kept.append(i)
            suppressed[i + 1:] |= within[i, i + 1:]
        winners = alive[block_kept]
        kept.append(winners)
        later = np.flatnonzero(~removed[stop:]) + stop
        if later.size == 0:
            continue
        winners_t, later_t = torch.from_numpy(winners).to(boxes.device), torch.from_numpy(later).to(boxes.device)
        over = _overlaps(
            boxes[winners_t], boxes[later_t],
            None if labels is None else labels[winners_t], None if labels is None else labels[later_t],
            iou_threshold,
        )
        removed[later[over.any(axis=0)]] = True
    kept_positions = torch.from_numpy(np.concatenate(kept)).to(boxes.device)
    return order[kept_positions]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Visits boxes by decreasing score and keeps a box unless a kept box overlaps it with
    IoU > ``iou_threshold`` (strictly greater, like the classic R-CNN/SPP detectors).
    Equal scores are broken by index: the earlier box is visited first.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` continuous pixel-edge boxes.
        scores (Tensor[N]): one score per box.
        iou_threshold (float): suppression threshold in [0, 1].

    Returns:
        LongTensor[K]: indices into ``boxes`` of the kept boxes, by decreasing score
        (ties by increasing index), on the boxes' device.

    IoUs are computed vectorised on the boxes' device, block by block in score order: only the
    kept boxes of a block are compared with the boxes after it that are still alive, so the
    work scales with (kept x N) rather than N^2; the sequential part runs on small boolean
    arrays on the CPU.
    """
    _check_boxes(boxes, "boxes")
    return _greedy_nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per-label greedy NMS: boxes only suppress boxes with the same label.

    Equivalent to running :func:`nms` separately for each label and merging the kept indices
    by decreasing score (ties by increasing index). Boxes of different labels are kept apart by
    masking the suppression matrix, not by the coordinate-offset trick, so IoUs are computed on
    the original coordinates and are bit-identical to per-label :func:`nms`.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` continuous pixel-edge boxes.
        scores (Tensor[N]): one score per box.
        labels (Tensor[N]): integer label per box.
        iou_threshold (float): suppression threshold.

    Returns:
        LongTensor[K]: kept indices into ``boxes``, by decreasing score.
    """
    _check_boxes(boxes, "boxes")
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have shape {tuple(scores.shape)}, got {tuple(labels.shape)}")
    return _greedy_nms(boxes, scores, labels, iou_threshold)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


def bbox_deltas(src: Tensor, dst: Tensor) -> Tensor:
    """R-CNN regression targets that move ``src`` boxes onto ``dst`` boxes.

    With centre ``(cx, cy)`` and size ``(w, h)`` of the continuous convention (``w = x2 - x1``,
    ``cx = x1 + w / 2``): ``dx = (cx_dst - cx_src) / w_src``, ``dy`` likewise,
    ``dw = log(w_dst / w_src)``, ``dh`` likewise. Both releases compute these on 1-based
    inclusive boxes with widths ``x2 - x1`` (``rcnn_train_bbox_regressor.m``,
    ``spp_train_bbox_regressor.m``: no "+1"), one pixel less than the continuous width used here;
    the targets differ by under 1% for windows over 100 pixels, and sppcli's boxes mean the same
    thing in training and at test time.

    Args:
        src (Tensor[N, 4]): proposal boxes, positive width and height.
        dst (Tensor[N, 4]): target (ground-truth) boxes, positive width and height.

    Returns:
        Tensor[N, 4]: ``(dx, dy, dw, dh)``.
    """
    _check_boxes(src, "src")
    _check_boxes(dst, "dst")
    src, dst = _as_float(src), _as_float(dst)
    if src.dtype != dst.dtype:
        src, dst = src.double(), dst.double()
    scx, scy, sw, sh = _centre_size(src)
    dcx, dcy, dw, dh = _centre_size(dst)
    return torch.stack(
        [(dcx - scx) / sw, (dcy - scy) / sh, torch.log(dw / sw), torch.log(dh / sh)], dim=1
    )


def apply_deltas(deltas: Tensor, src: Tensor) -> Tensor:
    """Inverse of :func:`bbox_deltas`: move ``src`` boxes by ``(dx, dy, dw, dh)``.

    ``dw`` and ``dh`` are clamped at :data:`DELTA_SIZE_CLAMP` (``log(1000/16)``) before
    exponentiation so that a wild regressor output cannot overflow.

    Args:
        deltas (Tensor[N, 4]): ``(dx, dy, dw, dh)``.
        src (Tensor[N, 4]): continuous pixel-edge boxes the deltas are relative to.

    Returns:
        Tensor[N, 4]: continuous pixel-edge boxes ``(x1, y1, x2, y2)`` (not clipped; see
        :func:`clip_boxes`).
    """
    _check_boxes(deltas, "deltas")
    _check_boxes(src, "src")
    deltas, src = _as_float(deltas), _as_float(src)
    if deltas.dtype != src.dtype:
        deltas, src = deltas.double(), src.double()
    cx, cy, w, h = _centre_size(src)
    new_cx = cx + deltas[:, 0] * w
    new_cy = cy + deltas[:, 1] * h
    new_w = w * torch.exp(deltas[:, 2].clamp(max=DELTA_SIZE_CLAMP))
    new_h = h * torch.exp(deltas[:, 3].clamp(max=DELTA_SIZE_CLAMP))
    return torch.stack(
        [new_cx - 0.5 * new_w, new_cy - 0.5 * new_h, new_cx + 0.5 * new_w, new_cy + 0.5 * new_h], dim=1
    )


def clip_boxes(boxes: Tensor, width: float, height: float) -> Tensor:
    """Clip boxes to a ``width x height`` image.

    Args:
        boxes (Tensor[N, 4]): continuous pixel-edge boxes.
        width, height: image size in pixels; in the continuous convention the image spans
            ``[0, width] x [0, height]``, so those are the bounds (not ``width - 1``).

    Returns:
        Tensor[N, 4]: a new tensor with x in ``[0, width]`` and y in ``[0, height]``.
    """
    _check_boxes(boxes, "boxes")
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]``, in numpy (window-to-target pairs, not all pairs).

    Args:
        a, b: float ``[N, 4]`` each, ``(x1, y1, x2, y2)`` continuous pixel-edge boxes.

    Returns:
        float64 ``[N]``; 0 where a pair's union is empty.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
