"""COCO detection metrics (mAP@[.5:.95], AP50, AP75) through pycocotools' COCOeval.

The ground truth is rebuilt in memory from the dataset's own ``ground_truth`` (through
:func:`sppcli.data.coco.instances_from_ground_truth`), for VOC and COCO datasets alike, so the
numbers are computed on exactly the objects the detector was trained and tested against:
the ``classes`` subset, boxes clipped to the image. On a COCO file with all its categories and
boxes inside their images this is the file's own ground truth.

What COCOeval does that the VOC devkit does not, so that the two are not read as one number:

- ten IoU thresholds 0.50:0.05:0.95, AP averaged over them (AP50 and AP75 are two of them);
- 101-point interpolated precision (recall 0:0.01:1), not 11 points or the area;
- at most 100 detections per image and class (``maxDets``), the highest scored;
- ignored ground truth is a *crowd* (VOC's "difficult" is written as one): a detection that
  matches it is neither TP nor FP, and its overlap with a crowd is intersection over the
  detection's own area, not IoU;
- ties in score are broken by pycocotools' own (mergesort) order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from typing import Mapping, Sequence

import numpy as np

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclasses.dataclass(frozen=True, eq=False)
class CocoEvalResult:
    """COCOeval's bbox numbers, overall and per class (area "all", 100 detections per image).

    mAP, AP50, AP75: COCO's first three summary numbers (NaN when no class has a positive).
    ap, ap50: class name -> AP@[.5:.95] / AP@.5; NaN for a class without non-crowd objects.
    n_positives: class name -> non-crowd (non-difficult) objects.
    recall_thresholds: float64 ``[101]``; precision50: class name -> float64 ``[101]``, the
        interpolated precision at IoU 0.5 at each recall threshold (0 past the last recall
        reached; NaN for a class without positives): the curve AP50 averages.
    stats: the 12 numbers ``COCOeval.summarize`` prints, -1 where COCO prints -1.
    """

    mAP: float
    AP50: float
    AP75: float
    ap: dict[str, float]
    ap50: dict[str, float]
    n_positives: dict[str, int]
    recall_thresholds: np.ndarray
    precision50: dict[str, np.ndarray]
    stats: list[float]


def coco_ground_truth(gt_by_image: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      class_names: Sequence[str]):
    """(pycocotools ``COCO`` of the ground truth, image id -> COCO image id).

    gt_by_image: image id -> (boxes float[G,4] internal, labels int[G], difficult bool[G]), the
        same mapping :func:`sppcli.data.voc_eval.evaluate` takes.
    """
    from sppcli.data.coco import _quiet_coco, instances_from_ground_truth
    from sppcli.data.voc import GroundTruth

    ids = list(gt_by_image)

    def ground_truth(image_id: str) -> GroundTruth:
        boxes, labels, difficult = gt_by_image[image_id]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        # COCOeval never reads the image size for boxes; 0 would only mislead a reader of the dict.
        return GroundTruth(image_id=image_id, width=0, height=0, boxes=boxes,
                           labels=np.asarray(labels, dtype=np.int64).reshape(-1),
                           difficult=np.asarray(difficult, dtype=bool).reshape(-1),
                           truncated=np.zeros(len(boxes), dtype=bool))

    doc = instances_from_ground_truth(ids, ground_truth, class_names)
    return _quiet_coco(doc), {image_id: number for number, image_id in enumerate(ids, 1)}


def evaluate_coco(
    gt_by_image: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    dets_by_class: Mapping[str, tuple[Sequence[str], np.ndarray, np.ndarray]],
    class_names: Sequence[str],
) -> CocoEvalResult:
    """COCO bbox evaluation of detections; arguments as :func:`sppcli.data.voc_eval.evaluate`.

    gt_by_image: image id -> (boxes float[G,4] internal, labels int[G], difficult bool[G]) for
        every test image; difficult objects count as crowds (ignored).
    dets_by_class: class name -> (image_ids [D], scores float[D], boxes float[D,4] internal).
    """
    from pycocotools.cocoeval import COCOeval

    from sppcli.data.coco import _quiet_coco

    unknown = set(dets_by_class) - set(class_names)
    if unknown:
        raise KeyError(f"detections for unknown classes {sorted(unknown)}; known: {list(class_names)}")
    if not gt_by_image:
        raise ValueError("COCO evaluation needs at least one ground-truth image")
    gt, number_of = coco_ground_truth(gt_by_image, class_names)

    results = []
    for k, name in enumerate(class_names):
        image_ids, scores, boxes = dets_by_class.get(name, ([], np.zeros(0), np.zeros((0, 4))))
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        for image_id, score, (x1, y1, x2, y2) in zip(image_ids, scores, boxes):
            if image_id not in number_of:
                raise KeyError(f"detection on unknown image {image_id!r} (not in the ground truth)")
            w, h = float(x2 - x1), float(y2 - y1)
            results.append({"id": len(results) + 1, "image_id": number_of[image_id], "category_id": k + 1,
                            "bbox": [float(x1), float(y1), w, h], "area": w * h, "score": float(score),
                            "iscrowd": 0})
    # Built like COCO.loadRes builds it, minus loadRes's refusal of an empty result list.
    dt = _quiet_coco({"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                      "annotations": results})

    evaluator = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    params = evaluator.params
    area_all = list(params.areaRngLbl).index("all")
    max_dets = len(params.maxDets) - 1  # 100
    at50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    precision = evaluator.eval["precision"]  # [T, R, K, A, M], -1 where a class has no positives

    n_positives = {name: 0 for name in class_names}
    for _image_id, (_boxes, labels, difficult) in gt_by_image.items():
        labels = np.asarray(labels).reshape(-1)
        for k in labels[~np.asarray(difficult, dtype=bool).reshape(-1)]:
            n_positives[class_names[int(k)]] += 1

    ap, ap50, curves = {}, {}, {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k, area_all, max_dets]
        if n_positives[name] == 0 or np.all(p < 0):
            ap[name] = ap50[name] = math.nan
            curves[name] = np.full(p.shape[1], math.nan)
            continue
        ap[name] = float(np.mean(p))
        ap50[name] = float(np.mean(p[at50]))
        curves[name] = p[at50].astype(np.float64)

    def number(value: float) -> float:
        return math.nan if value < 0 else float(value)

    stats = [float(v) for v in evaluator.stats]
    return CocoEvalResult(mAP=number(stats[0]), AP50=number(stats[1]), AP75=number(stats[2]), ap=ap,
                          ap50=ap50, n_positives=n_positives,
                          recall_thresholds=np.asarray(params.recThrs, dtype=np.float64),
                          precision50=curves, stats=stats)
