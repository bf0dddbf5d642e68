"""Slow, obviously correct references shared by tests."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sppcli.nets.heads import pooled_permutation


def iou_loop(a, b) -> float:
    """IoU of two internal (0-based continuous pixel-edge) boxes, in float64 scalar arithmetic."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reorder_pooled(pooled: np.ndarray, from_levels: Sequence[int], to_levels: Sequence[int],
                   channels: int) -> np.ndarray:
    """``pooled`` ``[N, D]`` laid out by ``from_levels`` -> the same bins laid out by ``to_levels``."""
    perm = pooled_permutation(from_levels, to_levels, channels)
    if pooled.shape[-1] != perm.shape[0]:
        raise ValueError(f"pooled vectors have {pooled.shape[-1]} columns; levels {tuple(from_levels)} "
                         f"with {channels} channels give {perm.shape[0]}")
    return pooled[..., perm]


def loop_nms(boxes, scores, threshold: float) -> list[int]:
    """Textbook greedy NMS: highest score first, ties by lower index, IoU > threshold suppresses."""
    box_list, score_list = boxes.double().tolist(), scores.double().tolist()
    order = sorted(range(len(box_list)), key=lambda i: (-score_list[i], i))
    kept: list[int] = []
    for i in order:
        if all(iou_loop(box_list[i], box_list[k]) <= threshold for k in kept):
            kept.append(i)
    return kept
