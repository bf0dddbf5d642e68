"""Stage "bbox_reg": per-class bounding-box regression from pooled conv5 features (paper 4.1).

As R-CNN's ``rcnn_train_bbox_regressor`` and the SPP release's ``spp_train_bbox_regressor``:

* training windows: every window (proposal or ground truth) whose IoU with its max-IoU ground
  truth is at least ``min_iou``; its class is that ground truth's class and its target R-CNN's
  ``(dx, dy, dw, dh)`` onto that ground truth's box (:func:`sppcli.detector.windows.regression_selection`).
  :func:`sppcli.detector.bbox_reg.fit_ridge_regressors` then keeps those with IoU ``> min_iou``
  strictly, as the release's per-class selection does, so a window at exactly ``min_iou`` is left out;
* features: the pooled conv5 vector of the pool item (the paper's counterpart of R-CNN's pool5),
  scaled so that its mean L2 norm over a seeded sample of training windows is 20, as R-CNN
  scales its regression features (``rcnn_feature_stats`` + ``rcnn_scale_features``);
* one ridge regression per class, ``lam`` = 4,000 as in the SPP release.

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
from sppcli.detector.bbox_reg import BBoxRegressor, fit_ridge_regressors, save_regressor
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


@dataclasses.dataclass(frozen=True, eq=False)
class RegressionWindows:
    """Training windows of a split: pooled features (storage dtype) ``[M, D]``, window boxes
    and their ground-truth boxes float32 ``[M, 4]``, classes int64 ``[M]``."""

    features: np.ndarray
    boxes: np.ndarray
    gt_boxes: np.ndarray
    labels: np.ndarray


def image_windows(path: str, pooled: PooledFeatures, min_iou: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pooled features, boxes, gt boxes, labels) of one pool item's regression windows."""
    with single_torch_thread():
        windows = read_pool_windows(Path(path))
        rows, labels, gt_index = regression_selection(windows.overlaps, windows.assigned_gt, windows.gt_labels,
                                                      min_iou)
        return pooled.window_rows(windows, rows), windows.boxes[rows], windows.gt_boxes[gt_index], labels


def collect_windows(paths: Sequence[str], pooled: PooledFeatures, min_iou: float, workers: int = 1,
                    scheduler: str | None = None) -> RegressionWindows:
    parts = map_images(functools.partial(image_windows, pooled=pooled, min_iou=min_iou), list(paths),
                       workers=workers, scheduler=scheduler, desc="bbox_reg: windows")
    if not parts:
        raise ValueError("no training images")
    return RegressionWindows(features=np.concatenate([p[0] for p in parts]),
                             boxes=np.concatenate([p[1] for p in parts]).reshape(-1, 4),
                             gt_boxes=np.concatenate([p[2] for p in parts]).reshape(-1, 4),
                             labels=np.concatenate([p[3] for p in parts]).astype(np.int64))


def training_fit(regressor: BBoxRegressor, data: RegressionWindows, classes: Sequence[str]) -> dict[str, Any]:
    """Per class: windows trained on, and their mean IoU with the ground truth before/after."""
    used = paired_iou(data.boxes, data.gt_boxes) > regressor.min_iou
    before = paired_iou(data.boxes[used], data.gt_boxes[used])
    predicted = regressor.predict(data.features[used], data.boxes[used], data.labels[used])
    after = paired_iou(predicted, data.gt_boxes[used])
    labels = data.labels[used]
    per_class = {}
    for k, name in enumerate(classes):
        mine = labels == k
        per_class[name] = {"windows": int(regressor.n_samples[k]),
                           "mean_iou_before": float(before[mine].mean()) if mine.any() else None,
                           "mean_iou_after": float(after[mine].mean()) if mine.any() else None}
    return {"per_class": per_class, "windows": int(used.sum()),
            "mean_iou_before": float(before.mean()) if before.size else None,
            "mean_iou_after": float(after.mean()) if after.size else None}


@single_torch_thread()  # small matrix work: a second OpenMP thread only waits on a busy core
def run(params: BBoxRegParams, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    started = time.perf_counter()
    classes = list(inputs.classes)
    paths = [str(inputs.pool.item_path(i)) for i in inputs.image_ids]

    pooled = pooled_features_of(inputs.pool, inputs.features)
    mean_norm, n_norm = mean_feature_norm([Path(p) for p in paths], pooled, lambda rows: rows.astype(np.float32),
                                          progress=lambda it, total: progress(it, total=total, desc="bbox_reg: norms"))
    scale = feature_scale(mean_norm, TARGET_NORM)
    data = collect_windows(paths, pooled, params.min_iou, inputs.workers, inputs.scheduler)
    log.info("bbox_reg: %d windows with IoU >= %.2f; mean pooled-feature norm %.3f over %d windows, scale %.5g",
             len(data.labels), params.min_iou, mean_norm, n_norm, scale)

    t_fit = time.perf_counter()
    regressor = fit_ridge_regressors(data.features, data.boxes, data.gt_boxes, data.labels, len(classes),
                                     lam=params.lam, feature_scale=scale, min_iou=params.min_iou)
    fit_seconds = time.perf_counter() - t_fit
    untrained = [name for k, name in enumerate(classes) if not regressor.trained[k]]
    for name in untrained:
        log.warning("bbox_reg: class %r has no training window; its boxes are left as they are", name)
    save_regressor(out.dir / OUTPUT, regressor, classes)

    fit = training_fit(regressor, data, classes)
    for name, entry in fit["per_class"].items():
        if entry["windows"]:
            log.info("bbox_reg: %14s %6d windows, mean IoU %.3f -> %.3f", name, entry["windows"],
                     entry["mean_iou_before"], entry["mean_iou_after"])
    metrics = {
        "classes": classes,
        "feature_dim": int(data.features.shape[1]) if data.features.ndim == 2 else None,
        "mean_norm": mean_norm,
        "norm_windows": n_norm,
        "feature_scale": scale,
        "untrained_classes": untrained,
        "training_windows": fit["windows"],
        "mean_iou_before": fit["mean_iou_before"],
        "mean_iou_after": fit["mean_iou_after"],
        "per_class": fit["per_class"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out.finish(metrics=metrics, timings={"fit_seconds": round(fit_seconds, 3)}, device="cpu")
