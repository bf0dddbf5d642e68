"""How well a set of proposal windows covers the ground truth: best overlaps, recall, MABO.

The measures of Uijlings et al. (IJCV 2013, section 5.1) used to judge selective search:

- the *best overlap* of a ground-truth box is its largest IoU with any proposal of its image;
- *recall at t* is the fraction of ground-truth boxes whose best overlap is at least ``t``;
- the *ABO* of a class is the mean best overlap of that class's ground-truth boxes, and the
  *MABO* is the mean of the ABOs over the classes that have ground truth.

Boxes are in the project's internal convention: float ``(x1, y1, x2, y2)``, 0-based continuous
pixel edges (so IoUs equal the VOC devkit's "+1" IoUs).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

RECALL_THRESHOLDS = (0.5, 0.7)  # the IoUs at which recall is reported

__all__ = ["best_overlaps", "recall_at", "mabo", "mean_best_overlap", "per_class_recall", "recall_by_size",
           "low_recall_advice", "format_recall_table"]


def best_overlaps(gt_boxes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Largest IoU of each ground-truth box with any proposal.

    Args:
        gt_boxes: float ``[G, 4]`` internal ``(x1, y1, x2, y2)``.
        boxes: float ``[N, 4]`` internal ``(x1, y1, x2, y2)`` proposals of the same image.
    Returns:
        float64 ``[G]``; all zeros when ``N == 0``.
    """
    import torch  # here, not at the top: the CLI imports this module for its table alone

    from sppcli.ops.boxes import box_iou

    gt = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))
    props = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    if gt.shape[0] == 0 or props.shape[0] == 0:
        return np.zeros(gt.shape[0], dtype=np.float64)
    return box_iou(gt, props).max(dim=1).values.numpy()


def recall_at(best: np.ndarray, threshold: float) -> float:
    """Fraction of ground-truth boxes with best overlap ``>= threshold``; NaN when there are none.

    Args:
        best: float ``[G]`` best overlaps, e.g. from :func:`best_overlaps` over a whole split.
    """
    best = np.asarray(best, dtype=np.float64).reshape(-1)
    if best.size == 0:
        return float("nan")
    return float(np.mean(best >= threshold))


def mean_best_overlap(best: np.ndarray) -> float:
    """Plain mean of the best overlaps over all ground-truth boxes (every box weighs the same)."""
    best = np.asarray(best, dtype=np.float64).reshape(-1)
    return float(best.mean()) if best.size else float("nan")


def mabo(best: np.ndarray, labels: np.ndarray) -> float:
    """Mean Average Best Overlap: the mean over classes of each class's mean best overlap.

    Args:
        best: float ``[G]`` best overlaps.
        labels: int ``[G]`` class index of each ground-truth box.
    Returns:
        The mean over the classes present in ``labels`` (classes without ground truth do not
        count); NaN when ``G == 0``.
    """
    best = np.asarray(best, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if best.shape != labels.shape:
        raise ValueError(f"best {best.shape} and labels {labels.shape} must have the same shape")
    if best.size == 0:
        return float("nan")
    return float(np.mean([best[labels == c].mean() for c in np.unique(labels)]))


def per_class_recall(best: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                     threshold: float = 0.5) -> dict[str, dict]:
    """Recall at ``threshold`` and ABO of every class: ``{name: {"n_gt", "recall", "abo"}}``.

    A class without ground truth gets ``n_gt = 0`` and NaN recall and ABO.
    """
    best = np.asarray(best, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    out = {}
    for index, name in enumerate(classes):
        mine = best[labels == index]
        out[name] = {"n_gt": int(mine.size), "recall": recall_at(mine, threshold),
                     "abo": mean_best_overlap(mine)}
    return out


#: Object size buckets (shorter side in pixels of the original image) that recall is broken down by.
SIZE_BUCKETS = ((0, 32, "< 32 px"), (32, 96, "32-96 px"), (96, 256, "96-256 px"), (256, float("inf"), ">= 256 px"))


def recall_by_size(best: np.ndarray, short_sides: np.ndarray, threshold: float = 0.5) -> dict[str, dict]:
    """Recall at ``threshold`` of the ground truth in each :data:`SIZE_BUCKETS` bucket:
    ``{label: {"n_gt", "recall"}}`` (NaN recall for an empty bucket)."""
    best = np.asarray(best, dtype=np.float64).reshape(-1)
    short_sides = np.asarray(short_sides, dtype=np.float64).reshape(-1)
    return {label: {"n_gt": int(((short_sides >= lo) & (short_sides < hi)).sum()),
                    "recall": recall_at(best[(short_sides >= lo) & (short_sides < hi)], threshold)}
            for lo, hi, label in SIZE_BUCKETS}


#: Below this recall at IoU 0.5 the proposals stage warns: the detector cannot find what no
#: window covers (selective search reaches ~98% on VOC).
LOW_RECALL = 0.8


def low_recall_advice(metrics: Mapping[str, Any], max_side: int, min_size: float, max_boxes: int,
                      image_long_side: float) -> str | None:
    """One warning line when recall@0.5 is under :data:`LOW_RECALL`, naming the likely cause
    (objects too small once the image is shrunk to ``max_side``, or under ``min_size``, or too
    few windows) and the option to change; None when recall is fine or unknown."""
    recall = metrics.get("recall@0.5")
    if recall is None or recall >= LOW_RECALL:
        return None
    sizes = metrics.get("recall_by_size") or {}
    small = sizes.get("< 32 px", {})
    shrink = min(1.0, max_side / image_long_side) if image_long_side else 1.0
    causes = []
    if small.get("n_gt") and small.get("recall") is not None and small["recall"] < recall:
        causes.append(f"objects under 32 px are found {100 * small['recall']:.0f}% of the time "
                      f"({small['n_gt']} of {metrics['n_gt']} objects)")
    if shrink < 0.75:
        causes.append(f"images (longer side ~{image_long_side:.0f} px) are segmented shrunk to "
                      f"proposals.max_side = {max_side} (x{shrink:.2f}), so a 32 px object is "
                      f"{32 * shrink:.0f} px there: raise it, e.g. --set proposals.max_side={int(min(image_long_side, 1000))}")
    if min_size > 8 and small.get("n_gt"):
        causes.append(f"windows under proposals.min_size = {min_size:g} px are dropped: lower it")
    if metrics.get("mean_boxes") and metrics["mean_boxes"] >= 0.95 * max_boxes:
        causes.append(f"images hit proposals.max_boxes = {max_boxes}: raise it")
    advice = "; ".join(causes) if causes else "check that the annotations match the images"
    return (f"proposals reach only {100 * recall:.1f}% recall at IoU 0.5 (under {100 * LOW_RECALL:.0f}%): "
            f"{advice} (`sppcli init` picks these settings from the dataset)")


def format_recall_table(metrics: Mapping[str, Any], title: str) -> str:
    """A small text table of a proposals manifest's metrics (overall, then recall per class)."""
    source = metrics.get("source", "selective_search")
    how = f"selective search, {metrics['mode']} mode" if source == "selective_search" else "imported boxes"
    seconds = metrics.get("seconds_per_image")
    lines = [
        f"{title} ({how})",
        f"  images                {metrics['n_images']}"
        + (f"  ({metrics['empty_images']} without windows)" if metrics.get("empty_images") else ""),
        f"  windows per image     {_fixed(metrics['mean_boxes'], 1)}  (min {metrics['min_boxes']}, max {metrics['max_boxes']})",
        f"  ground truth          {metrics['n_gt']} boxes ({metrics.get('ground_truth', 'non-difficult')})",
    ]
    for threshold in RECALL_THRESHOLDS:
        lines.append(f"  recall @ IoU {threshold:<8} {_percent(metrics.get(f'recall@{threshold}'))}")
    lines += [
        f"  MABO                  {_fixed(metrics['mabo'])}  (mean best overlap over all boxes {_fixed(metrics['mean_best_overlap'])})",
        f"  seconds per image     {_fixed(seconds, 3) if seconds is not None else '-'}",
    ]
    sizes = metrics.get("recall_by_size") or {}
    if any(v.get("n_gt") for v in sizes.values()):
        lines.append("  recall@0.5 by object size (shorter side): "
                     + ", ".join(f"{label} {_percent(v['recall'])} of {v['n_gt']}" for label, v in sizes.items()
                                 if v.get("n_gt")))
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(8, max(len(name) for name in per_class))
        lines.append(f"  {'class':<{width}}  {'n_gt':>6}  {'recall@0.5':>10}  {'ABO':>6}")
        for name, row in per_class.items():
            lines.append(f"  {name:<{width}}  {row['n_gt']:>6}  {_percent(row['recall']):>10}  {_fixed(row['abo']):>6}")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _fixed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
