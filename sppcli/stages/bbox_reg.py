"""Stage "bbox_reg": per-class bounding-box regression from pooled conv5 features (paper 4.1).

As R-CNN's ``rcnn_train_bbox_regressor`` and the SPP release's ``spp_train_bbox_regressor``:

* training windows: every window (proposal or ground truth) whose IoU with its max-IoU ground
  truth is at least ``min_iou``; its class is that ground truth's class and its target R-CNN's
  ``(dx, dy, dw, dh)`` onto that ground truth's box (:func:`sppcli.detector.windows.regression_selection`).
  of those, the ones with IoU ``> min_iou`` strictly train, as the release's per-class selection
  does, so a window at exactly ``min_iou`` is left out;
* features: the pooled conv5 vector of the pool item (the paper's counterpart of R-CNN's pool5),
  scaled so that its mean L2 norm over a seeded sample of training windows is 20, as R-CNN
  scales its regression features (``rcnn_feature_stats`` + ``rcnn_scale_features``);
* one ridge regression per class, ``lam`` = 4,000 as in the SPP release, the classes one after
  another (:func:`fit_classes`): memory holds the windows' positions for the whole split and the
  pooled vectors of one class at a time.

Output: ``bbox_reg.npz`` (:func:`sppcli.detector.bbox_reg.save_regressor`). Metrics: training
windows per class and their mean IoU with their ground truth before and after regression.
Detection applies the regressor to the same pooled rows (``pool.levels`` order) of its test windows.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sppcli.artifacts import Manifest, StageRun
from sppcli.detector.bbox_reg import BBoxRegressor, fit_class, save_regressor
from sppcli.ops.boxes import paired_iou
from sppcli.config import BBoxRegParams, Config
from sppcli.parallel import map_images, progress, single_torch_thread
from sppcli.stages.pool import pooled_features_of
from sppcli.detector.svm import feature_scale
from sppcli.detector.pooled_features import PooledFeatures
from sppcli.detector.windows import mean_feature_norm, read_pool_windows, regression_selection

Params = BBoxRegParams
log = logging.getLogger(__name__)

OUTPUT = "bbox_reg.npz"
# Maps kept between the per-class passes (an image holds objects of a few classes).
MAP_CACHE_BYTES = 2 << 30
TARGET_NORM = 20.0


def params_from(config: Config) -> BBoxRegParams:
    return config.bbox_reg


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The training split's pool items.

    Attributes:
        pool: pool manifest of the training split; features: the features artifact it was made from.
        image_ids: training images.
        classes: class names, label order.
    """

    pool: Manifest
    features: Manifest
    image_ids: tuple[str, ...]
    classes: tuple[str, ...]
    workers: int = 1
    scheduler: str | None = None


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    dataset = planner.dataset(plan.split)
    pool = upstream["pool"]
    return Inputs(pool=pool, features=upstream["features"], image_ids=tuple(dataset.ids),
                  classes=tuple(pool.metrics.get("classes") or dataset.classes),
                  workers=options.workers, scheduler=options.scheduler)


def check_params(params: BBoxRegParams) -> None:
    if params.lam < 0:
        raise ValueError(f"bbox_reg.lam must be >= 0, got {params.lam}")
    if not 0 <= params.min_iou < 1:
        raise ValueError(f"bbox_reg.min_iou must be in [0, 1), got {params.min_iou}")


def image_windows(path: str, min_iou: float) -> tuple:
    """One pool item's regression windows: ``(rows, classes, boxes, gt boxes, scale_index, cells)``,
    windows with IoU > ``min_iou`` with their ground truth (the release's strict per-class rule)."""
    windows = read_pool_windows(Path(path))
    rows, labels, gt_index = regression_selection(windows.overlaps, windows.assigned_gt, windows.gt_labels, min_iou)
    boxes, gts = windows.boxes[rows], windows.gt_boxes[gt_index]
    strict = paired_iou(boxes, gts) > min_iou
    return (rows[strict], labels[strict], boxes[strict], gts[strict], windows.scale_index[rows][strict],
            windows.cells[rows][strict])


@dataclasses.dataclass(frozen=True, eq=False)
class RegressionWindows:
    """Where the training windows of a split are (not their vectors): image index, row, class,
    window and ground-truth boxes, scale and cells, in image order."""

    image: np.ndarray
    row: np.ndarray
    label: np.ndarray
    boxes: np.ndarray
    gt_boxes: np.ndarray
    scale_index: np.ndarray
    cells: np.ndarray

    def of_class(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.label == k)


def collect_windows(paths: Sequence[str], min_iou: float, workers: int = 1, scheduler: str | None = None
                    ) -> RegressionWindows:
    parts = map_images(functools.partial(image_windows, min_iou=min_iou), list(paths), workers=workers,
                       scheduler=scheduler, desc="bbox_reg: windows")
    if not parts:
        raise ValueError("no training images")
    return RegressionWindows(image=np.concatenate([np.full(len(p[0]), i, np.int32) for i, p in enumerate(parts)]),
                             row=np.concatenate([p[0] for p in parts]).astype(np.int64),
                             label=np.concatenate([p[1] for p in parts]).astype(np.int64),
                             boxes=np.concatenate([p[2] for p in parts]).reshape(-1, 4),
                             gt_boxes=np.concatenate([p[3] for p in parts]).reshape(-1, 4),
                             scale_index=np.concatenate([p[4] for p in parts]),
                             cells=np.concatenate([p[5] for p in parts]).reshape(-1, 4))


def fit_classes(data: RegressionWindows, pooled: PooledFeatures, image_ids: Sequence[str], classes: Sequence[str],
                params: BBoxRegParams, scale: float) -> tuple[BBoxRegressor, dict[str, Any]]:
    """One regressor per class, the classes one after another: only one class's pooled vectors
    (float16, ~2.6 GB for VOC's ~100k person windows) are in memory at a time, pooled from the
    maps by a pass over the images that class appears in. Returns the regressor and, per class,
    its training windows and their mean IoU before and after regression."""
    dim = pooled.dim
    coef = np.zeros((len(classes), 4, dim), np.float32)
    intercept = np.zeros((len(classes), 4), np.float64)
    trained = np.zeros(len(classes), bool)
    n_samples = np.zeros(len(classes), np.int64)
    per_class, before_all, after_all = {}, [], []
    for k, name in enumerate(progress(classes, total=len(classes), desc="bbox_reg: classes", unit="class")):
        rows = data.of_class(k)
        n_samples[k] = len(rows)
        entry = {"windows": int(len(rows)), "mean_iou_before": None, "mean_iou_after": None}
        if len(rows):
            vectors = pooled.gather(image_ids, data.image[rows], data.row[rows], data.scale_index[rows], data.cells[rows])
            coef[k], intercept[k] = fit_class(vectors, data.boxes[rows], data.gt_boxes[rows], params.lam, scale)
            trained[k] = True
            one = BBoxRegressor(coef[k:k + 1], intercept[k:k + 1], trained[k:k + 1], n_samples[k:k + 1], scale,
                                params.lam, params.min_iou)
            moved = one.predict(vectors, data.boxes[rows], np.zeros(len(rows), np.int64))
            before = paired_iou(data.boxes[rows], data.gt_boxes[rows])
            after = paired_iou(moved, data.gt_boxes[rows])
            entry.update(mean_iou_before=float(before.mean()), mean_iou_after=float(after.mean()))
            before_all.append(before)
            after_all.append(after)
            del vectors
        per_class[name] = entry
    regressor = BBoxRegressor(coef, intercept, trained, n_samples, float(scale), float(params.lam),
                              float(params.min_iou))
    before, after = (np.concatenate(v) if v else np.zeros(0) for v in (before_all, after_all))
    return regressor, {"per_class": per_class, "windows": int(n_samples.sum()),
                       "mean_iou_before": float(before.mean()) if before.size else None,
                       "mean_iou_after": float(after.mean()) if after.size else None}


@single_torch_thread()  # small matrix work: a second OpenMP thread only waits on a busy core
def run(params: BBoxRegParams, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    started = time.perf_counter()
    classes = list(inputs.classes)
    paths = [str(inputs.pool.item_path(i)) for i in inputs.image_ids]

    pooled = pooled_features_of(inputs.pool, inputs.features, map_cache_bytes=MAP_CACHE_BYTES)
    mean_norm, n_norm = mean_feature_norm([Path(p) for p in paths], pooled, lambda rows: rows.astype(np.float32),
                                          progress=lambda it, total: progress(it, total=total, desc="bbox_reg: norms"))
    scale = feature_scale(mean_norm, TARGET_NORM)
    data = collect_windows(paths, params.min_iou, inputs.workers, inputs.scheduler)
    log.info("bbox_reg: %d windows with IoU > %.2f; mean pooled-feature norm %.3f over %d windows, scale %.5g",
             len(data.label), params.min_iou, mean_norm, n_norm, scale)

    t_fit = time.perf_counter()
    regressor, fit = fit_classes(data, pooled, inputs.image_ids, classes, params, scale)
    fit_seconds = time.perf_counter() - t_fit
    untrained = [name for k, name in enumerate(classes) if not regressor.trained[k]]
    for name in untrained:
        log.warning("bbox_reg: class %r has no training window; its boxes are left as they are", name)
    save_regressor(out.dir / OUTPUT, regressor, classes)

    for name, entry in fit["per_class"].items():
        if entry["windows"]:
            log.info("bbox_reg: %14s %6d windows, mean IoU %.3f -> %.3f", name, entry["windows"],
                     entry["mean_iou_before"], entry["mean_iou_after"])
    metrics = {
        "classes": classes,
        "feature_dim": int(pooled.dim),
        "mean_norm": mean_norm,
        "norm_windows": n_norm,
        "feature_scale": scale,
        "untrained_classes": untrained,
        "training_windows": fit["windows"],
        # the most vectors in memory at once: the largest class's
        "peak_vector_bytes": int(max((e["windows"] for e in fit["per_class"].values()), default=0) * pooled.row_bytes),
        "map_cache_bytes": int(pooled.maps.bytes),
        "mean_iou_before": fit["mean_iou_before"],
        "mean_iou_after": fit["mean_iou_after"],
        "per_class": fit["per_class"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out.finish(metrics=metrics, timings={"fit_seconds": round(fit_seconds, 3)}, device="cpu")
