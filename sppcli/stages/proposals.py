"""Stage "proposals": selective-search windows for every image of a split (paper section 4.1).

The paper uses selective search's "fast" mode, about 2,000 windows per image. Here the windows
come from OpenCV's ximgproc implementation (``opencv-contrib-python-headless``), or, when
``proposals.imported`` names a file, from boxes the user already has (:mod:`sppcli.data.proposal_files`).

Output: one HDF5 item per image, ``items/<id>.h5``, holding ``boxes`` float32 ``[N, 4]`` in the
internal convention (0-based continuous pixel edges ``(x1, y1, x2, y2)`` of the original image,
in OpenCV's ranking order) with attributes ``width``, ``height`` (stored pixels) and ``seconds``
(time spent on that image in its worker). The manifest's metrics say how well the windows cover
the split's non-difficult ground truth: recall at IoU 0.5 / 0.7 and MABO (Uijlings et al.).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import cv2
import h5py
import numpy as np

from sppcli.artifacts import Manifest, StageRun, atomic_path, json_number, open_item
from sppcli.config import Config, ProposalParams
from sppcli.parallel import map_images, progress
from sppcli.data.proposal_recall import (RECALL_THRESHOLDS, best_overlaps, low_recall_advice, mabo, mean_best_overlap,
                                         per_class_recall, recall_at, recall_by_size)

Params = ProposalParams
MODES = ("fast", "quality", "single")

log = logging.getLogger(__name__)


def params_from(config: Config) -> ProposalParams:
    return config.proposals


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The split to propose windows for, and how to spread the per-image work."""

    dataset: Any  # sppcli.data.voc.VocDataset
    workers: int = 1
    scheduler: str | None = None


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    dataset = planner.dataset(plan.split)
    dataset.check_inputs()
    return Inputs(dataset=dataset, workers=options.workers, scheduler=options.scheduler)


def check_params(params: ProposalParams) -> None:
    """Raise ValueError naming the bad field and what it accepts."""
    if params.mode not in MODES:
        raise ValueError(f"proposals.mode must be one of {', '.join(MODES)}, got {params.mode!r}")
    if params.max_boxes < 1:
        raise ValueError(f"proposals.max_boxes must be >= 1, got {params.max_boxes}")
    if params.imported_max_boxes < 0:
        raise ValueError(f"proposals.imported_max_boxes must be >= 0 (0 = all), got {params.imported_max_boxes}")
    if params.min_size < 0:
        raise ValueError(f"proposals.min_size must be >= 0, got {params.min_size}")
    if params.max_side < 16:
        raise ValueError(f"proposals.max_side must be >= 16, got {params.max_side}")


# ---------------------------------------------------------------------------------------------
# selective search on one image

# OpenCV ranks regions by ``rand() * level`` with the C library's global, never-seeded rand(),
# so the same image gives different boxes depending on how many images the process saw before.
# Seeding rand() right before each run makes the boxes a pure function of the image; the lock
# keeps threads of one process (a Dask worker's thread pool) from interleaving their draws.
_RAND_SEED = 1  # glibc's own initial state, so a fresh process's first image is unchanged
_rand_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _c_srand():
    names = ["ucrtbase", "msvcrt"] if sys.platform == "win32" else [ctypes.util.find_library("c")]
    for name in names:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            return ctypes.CDLL(name).srand
    log.warning("cannot reach the C library's srand(): selective search boxes will vary between runs")
    return None


def _segmentation(image_bgr: np.ndarray, mode: str) -> np.ndarray:
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image_bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality()
    elif mode == "single":
        ss.switchToSingleStrategy()
    else:
        raise ValueError(f"proposals.mode must be one of {', '.join(MODES)}, got {mode!r}")
    srand = _c_srand()
    with _rand_lock:
        if srand is not None:
            srand(_RAND_SEED)
        rects = ss.process()
    return np.asarray(rects, dtype=np.float64).reshape(-1, 4)


def clean_boxes(boxes: np.ndarray, width: int, height: int, min_size: float, max_boxes: int,
                round_to_pixels: bool) -> np.ndarray:
    """Clip, drop small boxes, drop exact duplicates and keep the first ``max_boxes``.

    Args:
        boxes: float ``[N, 4]`` internal ``(x1, y1, x2, y2)`` in ranking order.
        width, height: image size in pixels; boxes are clipped to ``(0, 0, width, height)``.
        min_size: boxes whose width or height is below this (pixels) are dropped; boxes without
            area are always dropped.
        round_to_pixels: round the coordinates to whole pixel edges first (duplicates are then
            judged on the rounded boxes).
    Returns:
        float32 ``[M, 4]``, M <= max_boxes, in the input's order (first occurrence kept).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    boxes = np.clip(boxes, 0.0, [width, height, width, height])
    if round_to_pixels:
        boxes = np.round(boxes)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    boxes = boxes[(sides > 0) & (sides >= min_size)]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    return boxes[:max_boxes].astype(np.float32)


def selective_search(image_rgb: np.ndarray, mode: str = "fast", max_boxes: int = 2000,
                     min_size: float = 16, max_side: int = 500) -> np.ndarray:
    """Selective-search windows of one image, in OpenCV's ranking order.

    The image is shrunk (area interpolation) so that its longer side is at most ``max_side``
    for the segmentation only; windows are mapped back to the original pixel grid, clipped,
    rounded to whole pixels, filtered by ``min_size`` (original pixels), de-duplicated and cut
    to ``max_boxes``. Deterministic: the same pixels give the same boxes in any process.

    Args:
        image_rgb: uint8 ``[H, W, 3]`` RGB.
    Returns:
        float32 ``[N, 4]`` internal ``(x1, y1, x2, y2)``, 0-based continuous pixel edges.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    factor = min(1.0, max_side / max(width, height))
    if factor < 1.0:
        small_w, small_h = max(1, round(width * factor)), max(1, round(height * factor))
        bgr = cv2.resize(bgr, (small_w, small_h), interpolation=cv2.INTER_AREA)
    else:
        small_w, small_h = width, height
    rects = _segmentation(bgr, mode)
    # OpenCV's Rect (x, y, w, h) covers pixels x .. x+w-1, i.e. continuous [x, x+w).
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    boxes *= [width / small_w, height / small_h, width / small_w, height / small_h]
    return clean_boxes(boxes, width, height, min_size, max_boxes, round_to_pixels=True)


def write_proposal_item(path: Path, boxes: np.ndarray, width: int, height: int, seconds: float,
                        source: str) -> None:
    """Atomically write one proposals item (the schema every proposals artifact shares)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("boxes", data=boxes)
            f.attrs["width"] = int(width)
            f.attrs["height"] = int(height)
            f.attrs["seconds"] = float(seconds)
            f.attrs["source"] = source


def read_proposal_item(path: Path) -> tuple[np.ndarray, dict]:
    """``(boxes float32 [N, 4], attrs)`` of one proposals item."""
    with open_item(path) as f:
        return f["boxes"][()].reshape(-1, 4), {k: v for k, v in f.attrs.items()}


def _propose_image(task: tuple[str, str, str], mode: str, max_boxes: int, min_size: int,
                   max_side: int) -> dict:
    """Worker: load one image, run selective search, write its item. Returns a small summary."""
    from sppcli.data.voc import load_rgb

    image_id, image_path, item_path = task
    started = time.perf_counter()
    image = load_rgb(Path(image_path))  # VocError names the file when it cannot be decoded
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # SS is single-threaded; parallelism comes from one process per image
    try:
        boxes = selective_search(image, mode, max_boxes, min_size, max_side)
    except cv2.error as exc:
        raise RuntimeError(f"{image_path}: selective search failed ({exc})") from exc
    finally:
        cv2.setNumThreads(threads)
    seconds = time.perf_counter() - started
    write_proposal_item(Path(item_path), boxes, image.shape[1], image.shape[0], seconds,
                        f"selective_search:{mode}")
    return {"image_id": image_id, "n_boxes": int(len(boxes)), "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# boxes the user already has (``proposals.imported``)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the stored pixel grid, as load_rgb decodes it, from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def import_proposals(source: Path, dataset, out: StageRun, fmt: str = "auto",
                     one_based_inclusive: bool | None = None, order: str | None = None,
                     min_size: float = 0, max_boxes: int | None = None) -> dict:
    """Write ``out``'s proposals items from the boxes in ``source``
    (:func:`sppcli.data.proposal_files.open_proposal_file` reads it).

    Each image's boxes go through the same cleaning as computed proposals (:func:`clean_boxes`:
    clip to the image, drop boxes without area or with a side below ``min_size``, drop exact
    duplicates, keep the first ``max_boxes``, order kept) and are written as the same items, so
    the pool stage cannot tell imported from computed proposals.

    Args:
        source: ``.npz``, ``.h5`` or R-CNN-style ``.mat`` file.
        dataset: the :class:`~sppcli.data.voc.VocDataset` split; every id must be in the file.
        out: the open proposals run; finished items are skipped (an interrupted import resumes).
        fmt, one_based_inclusive, order: the file's format and convention (None = defaults).
        min_size, max_boxes: the cleaning (``max_boxes=None``: all).
    Returns:
        A summary: ``format``, ``order``, ``one_based_inclusive``, ``extra_ids`` (ids in the
        file but not in the split, ignored), ``boxes_read`` and ``boxes_dropped`` (by clipping,
        size, duplicates and ``max_boxes``) over the images imported in this call.
    Raises:
        ProposalImportError: unreadable file, bad arrays, or split ids missing from the file.
    """
    from sppcli.data.proposal_files import open_proposal_file

    with open_proposal_file(source, dataset.ids, dataset.name, fmt, one_based_inclusive, order) as file:
        extra = len(set(file.ids) - set(dataset.ids))
        if extra:
            log.info("%s: ignoring %d id(s) that are not in %s", source, extra, dataset.name)
        read_total = dropped = 0
        for image_id in progress(out.pending(dataset.ids), desc=f"import proposals {dataset.name}"):
            started = time.perf_counter()
            boxes = file.boxes(image_id)
            width, height = image_size(dataset.image_path(image_id))
            kept = clean_boxes(boxes, width, height, min_size,
                               len(boxes) if max_boxes is None else max_boxes, round_to_pixels=False)
            read_total += len(boxes)
            dropped += len(boxes) - len(kept)
            write_proposal_item(out.item_path(image_id), kept, width, height,
                                time.perf_counter() - started, f"imported:{file.fmt}")
    if dropped:
        log.info("%s: dropped %d of %d boxes (outside the image, smaller than %s px, duplicates "
                 "or beyond max_boxes)", source, dropped, read_total, min_size)
    return {"format": file.fmt, "order": file.order, "one_based_inclusive": file.one_based_inclusive,
            "extra_ids": extra, "boxes_read": read_total, "boxes_dropped": dropped}


# ---------------------------------------------------------------------------------------------
# the stage


def run(params: ProposalParams, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    dataset = inputs.dataset
    if params.imported:
        from sppcli.data.proposal_files import parse_convention

        fmt, one_based, order = parse_convention(params.imported, params.imported_convention)
        summary = import_proposals(Path(params.imported), dataset, out, fmt=fmt,
                                   one_based_inclusive=one_based, order=order,
                                   min_size=params.min_size, max_boxes=params.imported_max_boxes or None)
        source = {"source": "imported", "imported": str(Path(params.imported).resolve()), **summary}
    else:
        pending = out.pending(dataset.ids)
        if len(pending) < len(dataset):
            log.info("proposals: %d of %d images already done, resuming", len(dataset) - len(pending), len(dataset))
        tasks = [(i, str(dataset.image_path(i)), str(out.item_path(i))) for i in pending]
        worker = functools.partial(_propose_image, mode=params.mode, max_boxes=params.max_boxes,
                                   min_size=params.min_size, max_side=params.max_side)
        map_images(worker, tasks, workers=inputs.workers, scheduler=inputs.scheduler,
                   desc=f"proposals {dataset.name}")
        source = {"source": "selective_search", "mode": params.mode}
    metrics = {**source, **proposal_metrics(dataset, out.items_dir)}
    advice = low_recall_advice(metrics, params.max_side, params.min_size, params.max_boxes,
                               metrics["median_image_long_side"] or 0.0)
    if advice and not params.imported:
        log.warning("%s", advice)
    if metrics["empty_images"]:
        log.warning("proposals: %d image(s) have no window left after filtering (e.g. %s); "
                    "lower proposals.min_size to keep smaller windows",
                    metrics["empty_images"], ", ".join(metrics["empty_image_ids"]))
    timings = {}
    if metrics["seconds_per_image"] is not None:
        timings["seconds_per_image"] = metrics["seconds_per_image"]
    return out.finish(metrics=metrics, timings=timings, n_items=len(dataset))


def proposal_metrics(dataset, items_dir: Path) -> dict:
    """Coverage of the split's non-difficult ground truth by the windows under ``items_dir``.

    Returns a JSON-able dict: ``n_images``, ``mean_boxes`` (per image), ``min_boxes``,
    ``max_boxes``, ``empty_images`` (+ up to 5 ``empty_image_ids``), ``n_gt``,
    ``recall@0.5``, ``recall@0.7``, ``mabo`` (mean over classes of the per-class mean best
    overlap), ``mean_best_overlap`` (over all ground-truth boxes), ``per_class``
    (``{name: {n_gt, recall (at 0.5), abo}}``), ``seconds_per_image`` (mean of the per-image
    worker seconds; null for imported boxes) and ``ground_truth`` (what was counted).
    """
    counts, seconds, best, labels, empty, sides, long_sides = [], [], [], [], [], [], []
    for image_id in progress(dataset.ids, total=len(dataset), desc="proposal recall"):
        boxes, attrs = read_proposal_item(Path(items_dir) / f"{image_id}.h5")
        counts.append(len(boxes))
        if not len(boxes):
            empty.append(image_id)
        if str(attrs.get("source", "")).startswith("selective_search"):
            seconds.append(float(attrs["seconds"]))
        gt = dataset.ground_truth(image_id)
        keep = ~gt.difficult
        best.append(best_overlaps(gt.boxes[keep], boxes))
        labels.append(gt.labels[keep])
        kept_boxes = gt.boxes[keep]
        sides.append(np.minimum(kept_boxes[:, 2] - kept_boxes[:, 0], kept_boxes[:, 3] - kept_boxes[:, 1]))
        long_sides.append(max(gt.width, gt.height))
    best_all = np.concatenate(best) if best else np.zeros(0)
    labels_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    per_class = per_class_recall(best_all, labels_all, dataset.classes, RECALL_THRESHOLDS[0])
    by_size = recall_by_size(best_all, np.concatenate(sides) if sides else np.zeros(0), RECALL_THRESHOLDS[0])
    metrics = {
        "n_images": len(counts),
        "mean_boxes": json_number(np.mean(counts), 2) if counts else None,
        "min_boxes": int(min(counts)) if counts else 0,
        "max_boxes": int(max(counts)) if counts else 0,
        "empty_images": len(empty),
        "empty_image_ids": empty[:5],
        "n_gt": int(best_all.size),
        "ground_truth": "non-difficult objects of the split's classes",
        "mabo": json_number(mabo(best_all, labels_all), 4),
        "mean_best_overlap": json_number(mean_best_overlap(best_all), 4),
        "seconds_per_image": json_number(np.mean(seconds), 4) if seconds else None,
        "per_class": {name: {"n_gt": v["n_gt"], "recall": json_number(v["recall"], 4),
                             "abo": json_number(v["abo"], 4)} for name, v in per_class.items()},
        "recall_by_size": {label: {"n_gt": v["n_gt"], "recall": json_number(v["recall"], 4)}
                           for label, v in by_size.items()},
        "median_image_long_side": float(np.median(long_sides)) if long_sides else None,
    }
    for threshold in RECALL_THRESHOLDS:
        metrics[f"recall@{threshold}"] = json_number(recall_at(best_all, threshold), 4)
    return metrics
