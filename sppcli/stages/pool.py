"""Stage "pool": the window table of every image, and optionally every window's pooled vector.

Per image, the windows are its ground-truth boxes (all of them, difficult ones included) followed
by its proposals. Each window is assigned to one scale's conv5 map: the scale at which its area is
closest to ``pool.target_size`` squared (224 x 224 in the paper, 208 x 208 in the release;
:func:`sppcli.ops.geometry.best_scale_index`). The window, multiplied by
that scale's resize factor, is mapped onto inclusive conv5 cells with the trunk's receptive-field
geometry (:func:`sppcli.ops.geometry.window_to_cells`). Those cells, max-pooled into
``pool.levels`` (1x1, 2x2, 3x3, 6x6 by default: 50 bins, 12,800-d for 256 channels) by
:func:`sppcli.ops.spp_pool.spp_pool`, are the window's feature vector. The stage also records
each window's IoU with the best ground truth of every class, which is all that fine-tuning, the
SVMs and box regression need to pick their samples.

By default the vectors are not stored: at 12,800-d float16 they take ~51 MB per VOC image
(500 GB for VOC 2007), while pooling them again from the conv5 map costs ~0.06 s per image. Every
consumer gets them from :class:`sppcli.detector.pooled_features.PooledFeatures` (see
:func:`pooled_features_of`), bit-identical either way. ``pool.store_features = true`` stores them.

Output: ``items/<id>.h5`` per image with (N windows, G ground truths, K classes, D features)

* ``boxes`` float32 ``[N, 4]``: internal ``(x1, y1, x2, y2)``, original image coordinates;
  rows ``0 .. G-1`` are the ground truths in annotation order, then the proposals.
* ``is_gt`` bool ``[N]``; ``gt_label`` int16 ``[N]`` (class index, -1 for proposals);
* ``scale_index`` int8 ``[N]`` (index into the features item's scales);
  ``cells`` int32 ``[N, 4]`` (inclusive conv5 cells on that scale's map);
* ``overlaps`` float32 ``[N, K]``: IoU with the best ground truth of each class (difficult
  included; 0 where the class has none);
* ``assigned_gt`` int32 ``[N]``: row of ``gt_boxes`` with the highest IoU, -1 if no ground
  truth overlaps the window;
* ``gt_boxes`` float32 ``[G, 4]``, ``gt_labels`` int16 ``[G]``, ``gt_difficult`` bool ``[G]``;
* with ``store_features``: ``features`` ``[N, D]`` (``pool.dtype``), levels in ``pool.levels``
  order, each level channel-major then bin row then bin column;
* attributes ``width``, ``height``, ``n_windows``, ``n_gt``, ``scale_counts`` (windows per scale)
  and ``seconds`` (that image's time).

N = 0 is a valid item (no ground truth and no proposals). The table's arrays are written with
HDF5's shuffle + gzip-1 (overlaps are mostly zeros): a few tens of KB per VOC image.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import torch

from sppcli.artifacts import ITEMS, Manifest, StageRun, atomic_path, item_attrs
from sppcli.config import STORAGE_DTYPES, Config, PoolParams
from sppcli.ops.boxes import box_iou
from sppcli.ops.geometry import FieldGeometry, best_scale_index, window_to_cells
from sppcli.detector.pooled_features import PooledFeatures, pool_rows
from sppcli.ops.spp_pool import pooled_dim
from sppcli.parallel import map_images, single_torch_thread
from sppcli.stages.features import FeatureItem, FeatureMaps, read_feature_item
from sppcli.stages.proposals import read_proposal_item

log = logging.getLogger(__name__)

Params = PoolParams


def params_from(config: Config) -> PoolParams:
    return config.pool


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The split, its proposals and features artifacts, and how to spread the work."""

    dataset: Any  # sppcli.data.voc.VocDataset
    proposals: Manifest
    features: Manifest
    workers: int = 1
    scheduler: str | None = None


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    return Inputs(dataset=planner.dataset(plan.split), proposals=upstream["proposals"],
                  features=upstream["features"], workers=options.workers, scheduler=options.scheduler)


def geometry_of(features: Manifest | Mapping) -> FieldGeometry:
    """The trunk geometry recorded in a features manifest's ``metrics["net"]``."""
    record = features if isinstance(features, Mapping) else features.metrics["net"]
    return FieldGeometry(stride=int(record["stride"]), offset0=float(record["offset0"]),
                         offset=float(record["offset"]))


# ---------------------------------------------------------------------------------------------
# per-window computations (pure functions)


def assign_windows(boxes: np.ndarray, item: FeatureItem, geometry: FieldGeometry, target_size: int = 224
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The scale and conv5 cells of every window.

    Args:
        boxes: float ``[N, 4]`` internal ``(x1, y1, x2, y2)`` in original image coordinates.
        item: the image's features item (``map_shapes`` and ``scale_factors``; maps not needed).
        geometry: the trunk's :class:`~sppcli.ops.geometry.FieldGeometry`.
        target_size: a window goes to the scale where its area is nearest ``target_size^2``.

    Returns:
        ``(scale_index int8 [N], cells int32 [N, 4])``.
    """
    boxes_t = torch.from_numpy(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    count = boxes_t.shape[0]
    cells = np.empty((count, 4), dtype=np.int32)
    if count == 0:
        return np.empty(0, dtype=np.int8), cells
    scale_index = best_scale_index(boxes_t, item.scale_factors, target_area=float(target_size) ** 2)
    for i, (factor, (_, map_h, map_w)) in enumerate(zip(item.scale_factors, item.map_shapes)):
        rows = torch.nonzero(scale_index == i).flatten()
        if rows.numel():
            cells[rows.numpy()] = window_to_cells(boxes_t[rows] * factor, geometry, map_h, map_w).numpy()
    return scale_index.numpy().astype(np.int8), cells


def pool_windows(boxes: np.ndarray, item: FeatureItem, geometry: FieldGeometry, levels: Sequence[int],
                 dtype: Any = np.float32, target_size: int = 224) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool every window on its best scale: ``(scale_index int8 [N], cells int32 [N, 4],
    features [N, C * sum(n * n)] of dtype)``; ``item`` must have its maps loaded."""
    scale_index, cells = assign_windows(boxes, item, geometry, target_size)
    features = np.empty((len(cells), pooled_dim(int(item.map_shapes[0][0]), levels)), dtype=dtype)
    for i, fmap in enumerate(item.maps):
        rows = np.flatnonzero(scale_index == i)
        if rows.size:
            features[rows] = pool_rows(fmap, cells[rows], levels, np.dtype(dtype))
    return scale_index, cells, features


def window_overlaps(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """IoU of windows with ground truth.

    Args:
        boxes: ``[N, 4]``, gt_boxes: ``[G, 4]``, internal boxes; gt_labels: int ``[G]`` class indices.
        num_classes: K.

    Returns:
        ``(overlaps float32 [N, K], assigned_gt int32 [N])``: per class the best IoU with a
        ground truth of that class (0 if none); the index of the ground truth with the highest
        IoU overall, -1 where every IoU is 0 (or G = 0).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    count = boxes.shape[0]
    overlaps = np.zeros((count, num_classes), dtype=np.float32)
    assigned = np.full(count, -1, dtype=np.int32)
    if count == 0 or gt_boxes.shape[0] == 0:
        return overlaps, assigned
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).numpy()  # [N, G] float64
    for k in np.unique(gt_labels):
        overlaps[:, k] = iou[:, gt_labels == k].max(axis=1)
    best = iou.argmax(axis=1)
    hit = iou[np.arange(count), best] > 0
    assigned[hit] = best[hit]
    return overlaps, assigned


# ---------------------------------------------------------------------------------------------
# one image (runs in map_images workers)


@dataclasses.dataclass(frozen=True)
class PoolJob:
    """Everything one worker needs for one image (small: paths and ground-truth arrays)."""

    image_id: str
    proposals_path: str
    features_path: str
    item_path: str
    gt_boxes: np.ndarray  # float32 [G, 4]
    gt_labels: np.ndarray  # int16 [G]
    gt_difficult: np.ndarray  # bool [G]


def pool_image(job: PoolJob, *, levels: Sequence[int], dtype: str, geometry: FieldGeometry, num_classes: int,
               store_features: bool = False, target_size: int = 224) -> dict:
    """Write one image's window table (and pooled vectors) atomically. Returns a small summary."""
    with single_torch_thread():
        return _pool_image(job, levels=levels, dtype=dtype, geometry=geometry, num_classes=num_classes,
                           store_features=store_features, target_size=target_size)


def _pool_image(job: PoolJob, *, levels: Sequence[int], dtype: str, geometry: FieldGeometry, num_classes: int,
                store_features: bool, target_size: int) -> dict:
    started = time.perf_counter()
    proposals, attrs = read_proposal_item(Path(job.proposals_path))
    width, height = int(attrs["width"]), int(attrs["height"])
    item = read_feature_item(Path(job.features_path), load_maps=store_features)
    if (item.width, item.height) != (width, height):
        raise ValueError(f"image {job.image_id}: proposals were made on a {width} x {height} image but "
                         f"features on {item.width} x {item.height}; rerun both stages on the same devkit")
    gt_boxes = np.asarray(job.gt_boxes, dtype=np.float32).reshape(-1, 4)
    gt_labels = np.asarray(job.gt_labels, dtype=np.int16).reshape(-1)
    boxes = np.concatenate([gt_boxes, proposals], axis=0)
    num_gt = gt_boxes.shape[0]
    if store_features:
        scale_index, cells, features = pool_windows(boxes, item, geometry, levels, np.dtype(dtype), target_size)
    else:
        (scale_index, cells), features = assign_windows(boxes, item, geometry, target_size), None
    overlaps, assigned = window_overlaps(boxes, gt_boxes, gt_labels, num_classes)
    is_gt = np.zeros(boxes.shape[0], dtype=bool)
    is_gt[:num_gt] = True
    gt_label = np.full(boxes.shape[0], -1, dtype=np.int16)
    gt_label[:num_gt] = gt_labels
    table = {"boxes": boxes, "is_gt": is_gt, "gt_label": gt_label, "scale_index": scale_index, "cells": cells,
             "overlaps": overlaps, "assigned_gt": assigned, "gt_boxes": gt_boxes, "gt_labels": gt_labels,
             "gt_difficult": np.asarray(job.gt_difficult, dtype=bool).reshape(-1)}
    with atomic_path(Path(job.item_path)) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, array in table.items():
                # Chunked filters need a non-empty shape; N = 0 items stay unfiltered.
                packed = dict(shuffle=True, compression="gzip", compression_opts=1) if array.size else {}
                f.create_dataset(name, data=array, **packed)
            if features is not None:
                f.create_dataset("features", data=features)
            f.attrs["width"] = int(width)
            f.attrs["height"] = int(height)
            f.attrs["n_windows"] = int(boxes.shape[0])
            f.attrs["n_gt"] = int(num_gt)
            f.attrs["scale_counts"] = np.bincount(scale_index.astype(np.int64), minlength=len(item.scales))
            f.attrs["seconds"] = float(time.perf_counter() - started)
    return {"id": job.image_id, "boxes": int(boxes.shape[0])}


# ---------------------------------------------------------------------------------------------
# the stage


def _check_params(params: PoolParams) -> None:
    if params.dtype not in STORAGE_DTYPES:
        raise ValueError(f"pool.dtype = {params.dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    if params.target_size < 1:
        raise ValueError(f"pool.target_size must be positive, got {params.target_size}")
    if not params.levels or any(int(n) < 1 for n in params.levels) or len(set(params.levels)) != len(params.levels):
        raise ValueError(f"pool.levels must be distinct positive integers, got {params.levels!r}")


def _summary(items_dir: Path, ids: Sequence[str], num_scales: int) -> dict:
    values = item_attrs(items_dir, ids, ["seconds", "n_windows", "n_gt", "scale_counts"])
    scale_counts = np.zeros(num_scales, dtype=np.int64)
    for counts in values["scale_counts"]:
        scale_counts += np.asarray(counts, dtype=np.int64)[:num_scales]

    def mean(name):
        return float(np.mean(values[name])) if values[name] else None

    total = int(scale_counts.sum())
    return {
        "pool_seconds_per_image": mean("seconds"),
        "bytes_per_image": mean("bytes"),
        "boxes_per_image": mean("n_windows"),
        "max_boxes_per_image": int(max(values["n_windows"])) if ids else 0,
        "gt_per_image": mean("n_gt"),
        "windows": int(sum(values["n_windows"])),
        "scale_fractions": [float(c / total) if total else 0.0 for c in scale_counts],
    }


def run(params: PoolParams, inputs: Inputs, out: StageRun) -> Manifest:
    _check_params(params)
    levels = [int(n) for n in params.levels]
    dataset = inputs.dataset
    classes = list(dataset.classes)
    record = inputs.features.metrics["net"]
    geometry = geometry_of(record)
    channels = int(record["channels"])
    net_levels = record.get("arch", {}).get("levels", levels)
    if sorted(net_levels) != sorted(levels):
        log.warning("pool.levels %s hold other bins than the net's SPP levels %s: pool5 features work, but the "
                    "net's fc6 cannot take these vectors (fine-tuning and fc6/fc7 SVMs will refuse them)",
                    levels, list(net_levels))
    ids = list(dataset.ids)
    pending = out.pending(ids)
    jobs = []
    for image_id in pending:
        gt = dataset.ground_truth(image_id)
        jobs.append(PoolJob(image_id=image_id, proposals_path=str(inputs.proposals.item_path(image_id)),
                            features_path=str(inputs.features.item_path(image_id)),
                            item_path=str(out.item_path(image_id)), gt_boxes=gt.boxes.astype(np.float32),
                            gt_labels=gt.labels.astype(np.int16), gt_difficult=gt.difficult.astype(bool)))
    fn = functools.partial(pool_image, levels=levels, dtype=params.dtype, geometry=geometry,
                           num_classes=len(classes), store_features=params.store_features,
                           target_size=params.target_size)
    log.info("pool: %d of %d images to do, levels %s (%d-d), %d classes, pooled vectors %s", len(pending), len(ids),
             levels, pooled_dim(channels, levels), len(classes),
             "stored" if params.store_features else "pooled on the fly by each consumer")
    started = time.perf_counter()
    map_images(fn, jobs, workers=inputs.workers, scheduler=inputs.scheduler, desc="pool")
    wall = time.perf_counter() - started
    metrics = {
        "feature_dim": pooled_dim(channels, levels),
        "levels": levels,
        "channels": channels,
        "classes": classes,
        "dtype": params.dtype,
        "store_features": bool(params.store_features),
        "scales": list(inputs.features.metrics.get("scales", [])),
        "images_this_run": len(pending),
        **_summary(out.items_dir, ids, len(inputs.features.metrics.get("scales", [])) or 1),
    }
    return out.finish(metrics=metrics, timings={"pool_seconds": round(wall, 3)}, n_items=len(ids), device="cpu")


def pooled_features_of(pool: Manifest, features: Manifest, map_cache_bytes: int = 0) -> PooledFeatures:
    """The pooled vectors of a pool artifact's windows, whether it stored them or not.

    ``features`` must be the features artifact the pool artifact was made from (its key is the
    pool manifest's upstream ``features``); its maps are what the vectors are pooled from.
    """
    if pool.upstream.get("features") != features.key:
        raise ValueError(f"pool artifact {pool.dir} was made from features {pool.upstream.get('features', '?')[:12]}, "
                         f"not {features.key[:12]}")
    stored = pool.item_path if pool.metrics.get("store_features") else None
    return PooledFeatures(pool.metrics["levels"], pool.metrics["dtype"], int(pool.metrics["channels"]),
                          FeatureMaps(features.path(ITEMS)), stored_item=stored, map_cache_bytes=map_cache_bytes)
