"""PASCAL VOC detection evaluation, following the VOC2007 devkit's ``VOCevaldet.m`` and ``VOCap.m``.

Boxes are float ``(x1, y1, x2, y2)`` in the internal continuous pixel-edge convention (pixel
column i covers [i, i+1)), so the plain IoU computed here equals the devkit's "+1" IoU on its
1-based inclusive boxes.

Devkit rules reproduced exactly (each was checked against ``VOCevaldet.m``):

- Detections are sorted by descending score with a *stable* sort (MATLAB's ``sort`` is stable,
  so tied scores keep their input order).
- A detection is compared with *every* ground truth of its image, matched or not, and takes the
  first one of maximal IoU among those it intersects with positive area. It is then
  - ignored (neither TP nor FP) if that ground truth is "difficult" and the IoU reaches the
    threshold; the difficult object is not marked as taken, and the detection does not fall
    back to another object;
  - a TP if the IoU reaches the threshold and that object is not yet taken (it becomes taken);
  - an FP if the IoU reaches the threshold but the object is already taken, even when another,
    untaken object also overlaps it enough (the devkit never looks past the best one);
  - an FP otherwise.
- "Reaches the threshold" is ``IoU >= 0.5``: the devkit tests ``ovmax >= VOCopts.minoverlap``.
  (The VOC papers say "exceed 50%", and some Python ports use ``>``; the devkit is the
  reference for published numbers.)
- ``n_positives`` counts only non-difficult objects.
- 11-point AP (VOC2007) averages, for thresholds t = 0, 0.1, ..., 1 built the way MATLAB's colon
  operator builds ``0:0.1:1``, the maximal precision at recall >= t (0 when there is none).
  MATLAB computes the first half of that vector forward (k * 0.1) and the second half backward
  from 1, so its fourth threshold is 0.30000000000000004 and a recall of exactly 3/10 does not
  reach it; this module reproduces those thresholds bit for bit.
- Area AP (VOC2010 onward, ``VOCap.m``) integrates the precision envelope (maximum precision
  at any recall to the right) over recall.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping, Sequence

import numpy as np

Metric = Literal["voc2007", "voc2010"]

# Short column headers used in the SPP-net paper's tables (Table 7 prints "areo", a typo).
VOC_SHORT_NAMES = {
    "aeroplane": "aero",
    "bicycle": "bike",
    "diningtable": "table",
    "motorbike": "mbike",
    "pottedplant": "plant",
    "tvmonitor": "tv",
}


def _matlab_colon_0_to_1_by_tenth() -> np.ndarray:
    # MATLAB's colon: first half a + k*d, second half b - (n - k)*d (n = 10 steps here).
    forward = [k * 0.1 for k in range(0, 6)]
    backward = [1.0 - (10 - k) * 0.1 for k in range(6, 11)]
    return np.array(forward + backward, dtype=np.float64)


VOC2007_RECALL_THRESHOLDS = _matlab_colon_0_to_1_by_tenth()


@dataclasses.dataclass(frozen=True, eq=False)
class ClassResult:
    """Evaluation of one class.

    All per-detection arrays are in evaluation order (descending score, stable).

    recall (float64[D]): cumulative TP / n_positives; all zeros when n_positives == 0.
    precision (float64[D]): cumulative TP / (TP + FP); NaN where no detection has been counted
        yet (only possible when the top-scoring detections were all ignored as difficult), as
        in the devkit.
    ap (float): average precision under ``metric``; 0.0 when there are no detections or no
        positives (check ``n_positives`` before averaging).
    n_positives (int): non-difficult ground-truth objects of this class.
    is_tp, is_fp (bool[D]): per-detection outcome; a detection that is neither was ignored
        (it matched a difficult object).
    order (int64[D]): index into the input detections of each evaluated detection.
    """

    recall: np.ndarray
    precision: np.ndarray
    ap: float
    n_positives: int
    is_tp: np.ndarray
    is_fp: np.ndarray
    order: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class EvalResult:
    """Evaluation of all classes.

    ap: class name -> AP (0.0 for classes without positives; see ``per_class``).
    mAP: mean AP over the classes that have at least one non-difficult object (NaN if none).
    per_class: class name -> ClassResult.
    """

    ap: dict[str, float]
    mAP: float
    per_class: dict[str, ClassResult]
    metric: str
    iou_threshold: float


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: Metric = "voc2007") -> float:
    """Average precision of one precision-recall curve, as the VOC devkit computes it.

    recall, precision (float[D]): cumulative values in evaluation order (recall non-decreasing).
        NaN precisions (no counted detection yet) are skipped, as MATLAB's ``max`` skips NaN.
    metric: "voc2007" = 11-point interpolated AP; "voc2010" = area under the precision envelope.
    Returns 0.0 for an empty curve.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall and precision differ in length: {recall.shape} vs {precision.shape}")
    if metric == "voc2007":
        total = 0.0
        for threshold in VOC2007_RECALL_THRESHOLDS:
            reached = precision[(recall >= threshold) & ~np.isnan(precision)]
            total += float(reached.max()) if reached.size else 0.0
        return total / len(VOC2007_RECALL_THRESHOLDS)
    if metric == "voc2010":
        padded_recall = np.concatenate([[0.0], recall, [1.0]])
        padded_precision = np.concatenate([[0.0], precision, [0.0]])
        # fmax ignores NaN like MATLAB's max; the trailing 0 keeps the envelope finite.
        envelope = np.fmax.accumulate(padded_precision[::-1])[::-1]
        steps = np.flatnonzero(padded_recall[1:] != padded_recall[:-1]) + 1
        return float(np.sum((padded_recall[steps] - padded_recall[steps - 1]) * envelope[steps]))
    raise ValueError(f"unknown metric {metric!r}; use 'voc2007' or 'voc2010'")


def _devkit_overlaps(box: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (float[4]) with gt_boxes (float[G,4]); -inf where they do not intersect.

    The devkit only considers objects with positive intersection width and height, so a
    touching or disjoint object can never be the match, whatever the threshold.
    """
    iw = np.minimum(box[2], gt_boxes[:, 2]) - np.maximum(box[0], gt_boxes[:, 0])
    ih = np.minimum(box[3], gt_boxes[:, 3]) - np.maximum(box[1], gt_boxes[:, 1])
    intersects = (iw > 0) & (ih > 0)
    inter = np.where(intersects, iw * ih, 0.0)
    union = (
        (box[2] - box[0]) * (box[3] - box[1])
        + (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        - inter
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(intersects, inter / union, -np.inf)


def evaluate_class(
    gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
    detections: tuple[Sequence[str], np.ndarray, np.ndarray],
    iou_threshold: float = 0.5,
    metric: Metric = "voc2007",
) -> ClassResult:
    """Evaluate the detections of one class against its ground truth.

    gt: image id -> (boxes float[G,4] internal convention, difficult bool[G]) for *every* test
        image, with empty arrays for images without objects of this class (a detection on an
        image missing from ``gt`` is an error, as in the devkit).
    detections: (image_ids [D], scores float[D], boxes float[D,4] internal convention).
    iou_threshold: a detection matches when IoU >= iou_threshold (devkit ``minoverlap``).
    """
    image_ids, scores, boxes = detections
    image_ids = list(image_ids)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not (len(image_ids) == scores.shape[0] == boxes.shape[0]):
        raise ValueError(
            f"detections disagree in length: {len(image_ids)} ids, {scores.shape[0]} scores, "
            f"{boxes.shape[0]} boxes"
        )

    gt_boxes, gt_difficult, n_positives = _class_ground_truth(gt)
    order, is_tp, is_fp = _match_detections(image_ids, scores, boxes, gt_boxes, gt_difficult, iou_threshold)
    tp_cumulative = np.cumsum(is_tp, dtype=np.float64)
    fp_cumulative = np.cumsum(is_fp, dtype=np.float64)
    counted = tp_cumulative + fp_cumulative
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(counted > 0, tp_cumulative / counted, np.nan)
    if n_positives > 0:
        recall = tp_cumulative / n_positives
        ap = average_precision(recall, precision, metric)
    else:
        # The devkit would divide by zero here; no class of a real VOC test set hits this.
        recall = np.zeros(len(order), dtype=np.float64)
        ap = 0.0
    return ClassResult(
        recall=recall,
        precision=precision,
        ap=ap,
        n_positives=n_positives,
        is_tp=is_tp,
        is_fp=is_fp,
        order=order.astype(np.int64),
    )


def _class_ground_truth(gt: Mapping[str, tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(boxes float64 [G, 4], difficult bool [G]) per image, and the number of non-difficult
    objects: the devkit's ``npos``."""
    gt_boxes: dict[str, np.ndarray] = {}
    gt_difficult: dict[str, np.ndarray] = {}
    n_positives = 0
    for image_id, (image_boxes, difficult) in gt.items():
        image_boxes = np.asarray(image_boxes, dtype=np.float64).reshape(-1, 4)
        difficult = np.asarray(difficult, dtype=bool).reshape(-1)
        if difficult.shape[0] != image_boxes.shape[0]:
            raise ValueError(f"image {image_id}: {image_boxes.shape[0]} boxes but {difficult.shape[0]} difficult flags")
        gt_boxes[image_id] = image_boxes
        gt_difficult[image_id] = difficult
        n_positives += int(np.count_nonzero(~difficult))
    return gt_boxes, gt_difficult, n_positives


def _match_detections(image_ids: Sequence[str], scores: np.ndarray, boxes: np.ndarray,
                      gt_boxes: Mapping[str, np.ndarray], gt_difficult: Mapping[str, np.ndarray],
                      iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The devkit's greedy matching by descending score: ``(order, is_tp, is_fp)``, the flags
    in rank order. A detection matching a difficult object is neither (it is ignored)."""
    taken = {image_id: np.zeros(len(d), dtype=bool) for image_id, d in gt_difficult.items()}
    # Stable sort of the negated scores, exactly like the devkit's [~, si] = sort(-confidence).
    order = np.argsort(-scores, kind="stable")
    is_tp = np.zeros(len(order), dtype=bool)
    is_fp = np.zeros(len(order), dtype=bool)
    for rank, index in enumerate(order):
        image_id = image_ids[index]
        if image_id not in gt_boxes:
            raise KeyError(f"detection on unknown image {image_id!r} (not in the ground truth)")
        image_boxes = gt_boxes[image_id]
        if image_boxes.shape[0] == 0:
            is_fp[rank] = True
            continue
        overlaps = _devkit_overlaps(boxes[index], image_boxes)
        best = int(np.argmax(overlaps))  # first of the maxima, as the devkit's strict ">" loop
        if overlaps[best] >= iou_threshold:
            if gt_difficult[image_id][best]:
                continue
            if taken[image_id][best]:
                is_fp[rank] = True
            else:
                is_tp[rank] = True
                taken[image_id][best] = True
        else:
            is_fp[rank] = True
    return order, is_tp, is_fp


def evaluate(
    gt_by_image: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    dets_by_class: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    metric: Metric = "voc2007",
    iou_threshold: float = 0.5,
) -> EvalResult:
    """Evaluate detections of every class.

    gt_by_image: image id -> (boxes float[G,4] internal convention, labels int[G] indexing
        ``class_names``, difficult bool[G]), for every image of the test set.
    dets_by_class: class name -> (image_ids [D], scores float[D], boxes float[D,4]); a class
        absent from the mapping has no detections (AP 0).
    mAP averages the APs of the classes with at least one non-difficult object.
    """
    unknown = set(dets_by_class) - set(class_names)
    if unknown:
        raise KeyError(f"detections for unknown classes {sorted(unknown)}; known: {list(class_names)}")
    per_image = {
        image_id: (
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64).reshape(-1),
            np.asarray(difficult, dtype=bool).reshape(-1),
        )
        for image_id, (boxes, labels, difficult) in gt_by_image.items()
    }
    empty = ([], np.zeros(0), np.zeros((0, 4)))
    per_class: dict[str, ClassResult] = {}
    for class_index, class_name in enumerate(class_names):
        class_gt = {
            image_id: (boxes[labels == class_index], difficult[labels == class_index])
            for image_id, (boxes, labels, difficult) in per_image.items()
        }
        per_class[class_name] = evaluate_class(
            class_gt, dets_by_class.get(class_name, empty), iou_threshold=iou_threshold, metric=metric
        )
    ap = {name: result.ap for name, result in per_class.items()}
    counted = [result.ap for result in per_class.values() if result.n_positives > 0]
    mean_ap = float(np.mean(counted)) if counted else math.nan
    return EvalResult(ap=ap, mAP=mean_ap, per_class=per_class, metric=metric, iou_threshold=iou_threshold)


@dataclasses.dataclass(frozen=True)
class FoundCount:
    """What a person sees in drawn detections: of ``objects`` (non-difficult) ground-truth
    objects, ``found`` are matched by a drawn box; ``false_boxes`` drawn boxes match none
    (duplicates of a found object included), both by the devkit's greedy matching."""

    images: int
    objects: int
    found: int
    false_boxes: int

    def __str__(self) -> str:
        return (f"{self.found} of {self.objects} objects found, {self.false_boxes} false "
                f"box{'es' if self.false_boxes != 1 else ''} in {self.images} images")


def found_and_false(
    gt_by_image: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    dets_by_class: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> FoundCount:
    """Objects found and false boxes among ``dets_by_class`` (the drawn ones; arguments as
    :func:`evaluate`, which does the matching)."""
    result = evaluate(gt_by_image, dets_by_class, class_names, iou_threshold=iou_threshold)
    classes = result.per_class.values()
    return FoundCount(images=len(gt_by_image), objects=sum(r.n_positives for r in classes),
                      found=int(sum(r.is_tp.sum() for r in classes)),
                      false_boxes=int(sum(r.is_fp.sum() for r in classes)))


def format_ap_table(rows: Mapping[str, Mapping[str, float]], class_names: Sequence[str]) -> str:
    """A plain-text AP table in the layout of the SPP-net paper's Table 7.

    rows: method name -> {class name -> AP in [0, 1]}. Columns: method, mAP, then one per class
    (VOC names shortened as in the paper). Numbers are percent with one decimal. A class that is
    missing from a row, NaN or None (JSON's null) prints "-" and is left out of that row's mAP,
    which is the mean of the row's other classes.
    """
    headers = ["method", "mAP"] + [VOC_SHORT_NAMES.get(name, name) for name in class_names]
    body = []
    for method, aps in rows.items():
        values = [math.nan if aps.get(name) is None else aps[name] for name in class_names]
        finite = [v for v in values if not math.isnan(v)]
        mean_ap = sum(finite) / len(finite) if finite else math.nan
        body.append([str(method)] + [_percent(v) for v in [mean_ap] + values])
    widths = [max(len(row[i]) for row in [headers] + body) for i in range(len(headers))]
    lines = []
    for row in [headers] + body:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100.0 * value:.1f}"
