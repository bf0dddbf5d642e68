"""Which pooled windows the detector's learning stages train on (paper section 4.1).

Reading pool items (``items/<id>.h5`` of the pool stage: window metadata, and pooled feature
rows on demand) and choosing windows by their IoU with the ground truth:

* fine-tuning: positives have max IoU in ``[fg_iou, 1]`` (label = 1 + the class of the max IoU),
  negatives max IoU in ``[bg_iou_low, fg_iou)`` (label 0, background); mini-batches of
  ``batch_size`` windows of which ``fg_fraction`` are positives (:class:`FinetuneSampler`);
* SVMs: positives are the ground-truth windows of the class, negatives the windows whose IoU
  with every ground truth of the class is ``< neg_iou``;
* bounding-box regression: windows whose IoU with their max-IoU ground truth is ``>= min_iou``,
  with that ground truth's class and box as the target.

Ground-truth windows are rows of the pool items like any proposal (``is_gt``), so they are
selected by the same IoU rules (their IoU with themselves is 1). Difficult ground truths are
included everywhere (in ``overlaps`` and as GT windows), as both the R-CNN release and the SPP
release's experiment scripts do (``roidb_from_voc`` keeps every object).

Everything here but :func:`read_pool_windows`, :func:`count_windows` and :func:`mean_feature_norm`
is a pure function of numpy arrays; pooled vectors come from
:class:`sppcli.detector.pooled_features.PooledFeatures`. Boxes are float32
``(x1, y1, x2, y2)`` in the internal 0-based continuous pixel-edge convention.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# pool items


@dataclasses.dataclass(frozen=True, eq=False)
class PoolWindows:
    """One pool item's windows without their features.

    Attributes:
        image_id: the image.
        path: the item's HDF5 file (features are read from it on demand).
        boxes: float32 ``[N, 4]``, ground-truth windows first, then proposals.
        is_gt: bool ``[N]``.
        gt_label: int16 ``[N]``: class index of a ground-truth window, -1 for proposals.
        scale_index: int8 ``[N]``: the scale each window is pooled at (index into the features
            item's scales); cells: int32 ``[N, 4]``: its inclusive conv5 cells on that map.
        overlaps: float32 ``[N, K]``: IoU with the best ground truth of each class (difficult
            ground truths included).
        assigned_gt: int32 ``[N]``: index into ``gt_boxes`` of the max-IoU ground truth, -1 if
            the window overlaps none.
        gt_boxes: float32 ``[G, 4]``; gt_labels: int16 ``[G]``; gt_difficult: bool ``[G]``.
        width, height: image size in pixels.
    """

    image_id: str
    path: Path
    boxes: np.ndarray
    is_gt: np.ndarray
    gt_label: np.ndarray
    scale_index: np.ndarray
    cells: np.ndarray
    overlaps: np.ndarray
    assigned_gt: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


_META_DATASETS = ("boxes", "is_gt", "gt_label", "scale_index", "cells", "overlaps", "assigned_gt", "gt_boxes",
                  "gt_labels", "gt_difficult")


def read_pool_windows(path: Path, image_id: str | None = None) -> PoolWindows:
    """Read the window table of one pool item (not its stored features, if any)."""
    from sppcli.artifacts import open_item

    path = Path(path)
    with open_item(path) as f:
        arrays = {name: f[name][()] for name in _META_DATASETS}
        width, height = int(f.attrs["width"]), int(f.attrs["height"])
    n = arrays["boxes"].shape[0]
    overlaps = arrays["overlaps"]
    if overlaps.ndim != 2:  # written as [N, K]; a 1-D array can only be an empty one
        overlaps = overlaps.reshape(n, -1) if n else overlaps.reshape(0, 0)
    return PoolWindows(
        image_id=image_id if image_id is not None else path.stem,
        path=path,
        boxes=arrays["boxes"].reshape(-1, 4).astype(np.float32, copy=False),
        is_gt=arrays["is_gt"].astype(bool, copy=False),
        gt_label=arrays["gt_label"].astype(np.int16, copy=False),
        scale_index=arrays["scale_index"].astype(np.int8, copy=False),
        cells=arrays["cells"].reshape(-1, 4).astype(np.int32, copy=False),
        overlaps=overlaps.astype(np.float32, copy=False),
        assigned_gt=arrays["assigned_gt"].astype(np.int32, copy=False),
        gt_boxes=arrays["gt_boxes"].reshape(-1, 4).astype(np.float32, copy=False),
        gt_labels=arrays["gt_labels"].astype(np.int16, copy=False),
        gt_difficult=arrays["gt_difficult"].astype(bool, copy=False),
        width=width,
        height=height,
    )


def read_feature_rows(dataset, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of an HDF5 ``features`` dataset ``[N, D]`` in any order, with repeats.

    HDF5 point selections must be strictly increasing, so the unique sorted rows are read once
    and scattered back. ``rows=None`` reads the whole dataset. Returns ``[len(rows), D]`` in the
    dataset's dtype.
    """
    if rows is None:
        return dataset[()]
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size == 0:
        return np.empty((0,) + tuple(dataset.shape[1:]), dtype=dataset.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    # A hyperslab of the whole span is far faster than a long point list when rows are dense.
    span = int(unique[-1] - unique[0] + 1)
    if span <= 4 * unique.size:
        block = dataset[int(unique[0]):int(unique[-1]) + 1]
        return block[rows - unique[0]]
    return dataset[unique][inverse]


# ---------------------------------------------------------------------------------------------
# IoU rules


def max_overlap(overlaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the largest IoU with any ground truth and the class it belongs to.

    Args:
        overlaps: float ``[N, K]`` IoU with the best ground truth of each class.

    Returns:
        ``(iou float32 [N], cls int64 [N])``; with no classes (K = 0) the IoU is 0 and the
        class -1. Ties go to the lower class index.
    """
    overlaps = np.asarray(overlaps, dtype=np.float32)
    n = overlaps.shape[0]
    if overlaps.ndim != 2:
        raise ValueError(f"overlaps must be [N, K], got shape {overlaps.shape}")
    if overlaps.shape[1] == 0:
        return np.zeros(n, np.float32), np.full(n, -1, np.int64)
    cls = overlaps.argmax(axis=1).astype(np.int64)
    return overlaps[np.arange(n), cls], cls


def finetune_selection(overlaps: np.ndarray, fg_iou: float, bg_iou_low: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-tuning windows of one image.

    Positives: max IoU in ``[fg_iou, 1]``, label = 1 + class of the max IoU. Negatives: max IoU
    in ``[bg_iou_low, fg_iou)``, label 0 (background).

    Returns:
        ``(fg_rows int64 [F], fg_labels int64 [F] in 1..K, bg_rows int64 [B])``, rows ascending.
    """
    iou, cls = max_overlap(overlaps)
    fg = iou >= fg_iou
    bg = (iou >= bg_iou_low) & (iou < fg_iou)
    fg_rows = np.flatnonzero(fg).astype(np.int64)
    return fg_rows, cls[fg_rows] + 1, np.flatnonzero(bg).astype(np.int64)


def svm_positive_rows(is_gt: np.ndarray, gt_label: np.ndarray, cls: int) -> np.ndarray:
    """Rows of the ground-truth windows of class ``cls`` (int64, ascending)."""
    return np.flatnonzero(np.asarray(is_gt, bool) & (np.asarray(gt_label) == cls)).astype(np.int64)


def svm_negative_rows(class_overlaps: np.ndarray, neg_iou: float) -> np.ndarray:
    """Rows whose IoU with every ground truth of the class is ``< neg_iou``.

    Args:
        class_overlaps: float ``[N]``, column ``cls`` of the item's ``overlaps``.

    Ground-truth windows of other classes qualify like proposals (R-CNN does the same).
    """
    return np.flatnonzero(np.asarray(class_overlaps) < neg_iou).astype(np.int64)


def regression_selection(overlaps: np.ndarray, assigned_gt: np.ndarray, gt_labels: np.ndarray,
                         min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounding-box regression windows of one image.

    A window is used when its IoU with its max-IoU ground truth (``assigned_gt``) is
    ``>= min_iou``; its class is that ground truth's class and its target that ground truth's
    box (R-CNN's ``rcnn_train_bbox_regressor``, whose example gathering uses ``>=``; its
    per-class fit then keeps ``> min_iou``, which :func:`sppcli.detector.bbox_reg.fit_ridge_regressors`
    applies). Ground-truth windows qualify (IoU 1) and get zero targets.

    Returns:
        ``(rows int64 [M], classes int64 [M], gt_index int64 [M])``.
    """
    iou, _ = max_overlap(overlaps)
    assigned_gt = np.asarray(assigned_gt, dtype=np.int64)
    rows = np.flatnonzero((iou >= min_iou) & (assigned_gt >= 0)).astype(np.int64)
    gt_index = assigned_gt[rows]
    return rows, np.asarray(gt_labels, dtype=np.int64)[gt_index], gt_index


def distinct_windows(scale_index: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows that pool the same conv5 cells at the same scale, found once.

    Such windows have identical pooled vectors, so their fc features and scores are computed
    once (selective search gives many: at the demo's scale 37% of the test windows repeat
    another one's cells).

    Args:
        scale_index: int ``[N]``; cells: int ``[N, 4]``.
    Returns:
        ``(first int64 [U], inverse int64 [N])``: ``first`` the first row of each distinct
        window, ascending; window ``i`` is the same as ``first[inverse[i]]``.
    """
    keys = np.concatenate([np.asarray(cells, np.int64).reshape(-1, 4),
                           np.asarray(scale_index, np.int64).reshape(-1, 1)], axis=1)
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # distinct windows in row order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order].astype(np.int64), rank[inverse.reshape(-1)].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# samples


def norm_sample(rng: np.random.Generator, counts: Sequence[int], max_images: int = 200,
                per_image: int = 200) -> list[tuple[int, np.ndarray]]:
    """Which windows estimate the mean feature norm (R-CNN's ``rcnn_feature_stats``).

    ``max_images`` random images, ``per_image`` random windows of each (all when fewer).

    Args:
        counts: number of windows of each image.

    Returns:
        ``[(image_index, rows int64 ascending)]`` sorted by image index, empty images left out.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_images = min(len(counts), max_images)
    images = np.sort(rng.permutation(len(counts))[:n_images])
    sample = []
    for i in images:
        n = int(counts[i])
        if n == 0:
            continue
        rows = np.sort(rng.permutation(n)[:per_image]).astype(np.int64)
        sample.append((int(i), rows))
    return sample


def count_windows(path: Path) -> int:
    """Number of windows (N) of one pool item, without reading them."""
    from sppcli.artifacts import open_item

    with open_item(path) as f:
        return int(f["boxes"].shape[0])


NORM_SEED = 3  # R-CNN's seed_rand() seed for its feature statistics


def mean_feature_norm(paths: Sequence[Path], pooled, transform: Callable[[np.ndarray], np.ndarray],
                      seed: int = NORM_SEED, max_images: int = 200, per_image: int = 200,
                      progress=None) -> tuple[float, int]:
    """Mean L2 norm of ``transform(pooled rows)`` over a seeded :func:`norm_sample` of windows.

    Args:
        paths: the pool items (window tables), in image order.
        pooled: the split's :class:`~sppcli.detector.pooled_features.PooledFeatures`.
        transform: pooled ``[n, D]`` (storage dtype) -> features ``[n, D']`` whose norm is
            wanted (e.g. the fc7 of a head, or a float32 copy for pool5).
        seed: seed of the sample, so that the estimate (and every model scaled by it) is
            reproducible.
        progress: optional ``progress(iterable, total=...)`` wrapper.

    Returns:
        ``(mean norm, number of windows it averages)``.

    Raises:
        ValueError: the items hold no window at all.
    """
    wrap = progress or (lambda iterable, total: iterable)
    counts = [count_windows(p) for p in wrap(paths, total=len(paths))]
    sample = norm_sample(np.random.default_rng(seed), counts, max_images, per_image)
    norms = []
    for image, rows in wrap(sample, total=len(sample)):
        windows = read_pool_windows(paths[image])
        features = transform(pooled.window_rows(windows, rows))
        norms.append(np.linalg.norm(np.asarray(features, dtype=np.float64), axis=1))
    if not norms:
        raise ValueError("no windows in the pool items: cannot estimate the mean feature norm")
    norms = np.concatenate(norms)
    return float(norms.mean()), int(norms.size)


@dataclasses.dataclass(frozen=True, eq=False)
class WindowSet:
    """Selected windows of a whole split, as parallel flat arrays (about 43 bytes a window, so
    VOC 2007's ~2.8M fine-tuning windows take ~120 MB; their pooled vectors would take 72 GB).

    Attributes:
        image: int32 ``[M]`` index of the image (into the stage's image list).
        row: int32 ``[M]`` row in that image's window table.
        label: int16 ``[M]`` training label.
        scale_index: int8 ``[M]`` and cells: int32 ``[M, 4]``: where each window is pooled.
        boxes: float32 ``[M, 4]``: the window in image coordinates (to pool it elsewhere: at
            another scale, or on the flipped image).
    """

    image: np.ndarray
    row: np.ndarray
    label: np.ndarray
    scale_index: np.ndarray
    cells: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.image, self.row, self.label, self.scale_index, self.cells, self.boxes

    @staticmethod
    def concat(parts: Sequence[tuple]) -> "WindowSet":
        """From ``[(image_index, rows, labels, scale_index, cells, boxes)]`` per image."""
        if not parts:
            return WindowSet(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int16),
                             np.empty(0, np.int8), np.empty((0, 4), np.int32), np.empty((0, 4), np.float32))
        return WindowSet(image=np.concatenate([np.full(len(p[1]), p[0], np.int32) for p in parts]),
                         row=np.concatenate([np.asarray(p[1], np.int32) for p in parts]),
                         label=np.concatenate([np.asarray(p[2], np.int16) for p in parts]),
                         scale_index=np.concatenate([np.asarray(p[3], np.int8) for p in parts]),
                         cells=np.concatenate([np.asarray(p[4], np.int32).reshape(-1, 4) for p in parts]),
                         boxes=np.concatenate([np.asarray(p[5], np.float32).reshape(-1, 4) for p in parts]))

    def take(self, indices: np.ndarray) -> "WindowSet":
        indices = np.asarray(indices, dtype=np.int64)
        return WindowSet(*(a[indices] for a in self._arrays()))

    @staticmethod
    def join(first: "WindowSet", second: "WindowSet") -> "WindowSet":
        return WindowSet(*(np.concatenate([a, b]) for a, b in zip(first._arrays(), second._arrays())))


@dataclasses.dataclass(frozen=True)
class MiniBatch:
    """One fine-tuning mini-batch: positives first, then negatives.

    Attributes:
        fg: int64 indices into the positive :class:`WindowSet`; bg: into the negative one.
        labels: int64 ``[len(fg) + len(bg)]``: the positives' labels, then zeros.
        flip: bool ``[len(fg) + len(bg)]``: pool the window on the flipped image.
        scale: int64 ``[len(fg) + len(bg)]``: pool it at this scale; -1 = its chosen scale.
    """

    fg: np.ndarray
    bg: np.ndarray
    labels: np.ndarray
    flip: np.ndarray
    scale: np.ndarray


def batch_counts(batch_size: int, fg_fraction: float, n_fg: int, n_bg: int) -> tuple[int, int]:
    """(positives, negatives) per mini-batch.

    ``round(fg_fraction * batch_size)`` positives (32 of 128 in the paper), the rest negatives;
    when a side has no windows at all, the other fills the batch.
    """
    if n_fg + n_bg == 0:
        raise ValueError("no fine-tuning windows: no window has IoU >= bg_iou_low with a ground truth")
    fg = int(round(fg_fraction * batch_size))
    fg = min(max(fg, 0), batch_size)
    if n_fg == 0:
        fg = 0
    elif n_bg == 0:
        fg = batch_size
    return fg, batch_size - fg


class FinetuneSampler:
    """Mini-batches of positive and negative windows, a pure function of (seed, iteration).

    Each mini-batch draws its positives uniformly from all positive windows of the split
    (without replacement within the batch when there are enough, with replacement when there
    are too few, as R-CNN's window data layer samples), likewise its negatives. Seeding each
    iteration's generator with ``(seed, iteration)`` makes the sampler state the iteration
    number alone, so a resumed run draws exactly the batches an uninterrupted one would.

    The release's augmentations: with ``flip`` the flipped images' windows join the population
    (a draw from twice as many windows, the second half flipped); with ``random_scales = S > 0``
    every drawn window gets a scale drawn uniformly from ``0 .. S - 1`` (``random_scale = 1`` in
    ``spp_finetune_voc.m``: any of the cached scales, whatever the window's size). Without them
    the draws are those of the plain sampler.
    """

    def __init__(self, positives: WindowSet, negatives: WindowSet, batch_size: int, fg_fraction: float,
                 seed: int, flip: bool = False, random_scales: int = 0):
        self.positives = positives
        self.negatives = negatives
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.flip = bool(flip)
        self.random_scales = int(random_scales)
        self.n_fg, self.n_bg = batch_counts(self.batch_size, fg_fraction, len(positives), len(negatives))

    def batch(self, iteration: int) -> MiniBatch:
        rng = np.random.default_rng([self.seed, int(iteration)])
        copies = 2 if self.flip else 1
        fg = _draw(rng, copies * len(self.positives), self.n_fg)
        bg = _draw(rng, copies * len(self.negatives), self.n_bg)
        flip = np.concatenate([fg >= len(self.positives), bg >= len(self.negatives)])
        if self.flip:
            fg, bg = fg % max(1, len(self.positives)), bg % max(1, len(self.negatives))
        count = len(fg) + len(bg)
        scale = rng.integers(0, self.random_scales, count) if self.random_scales else np.full(count, -1)
        labels = np.concatenate([self.positives.label[fg].astype(np.int64), np.zeros(len(bg), np.int64)])
        return MiniBatch(fg=fg, bg=bg, labels=labels, flip=flip, scale=scale.astype(np.int64))


def _draw(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    if k == 0:
        return np.empty(0, np.int64)
    return rng.choice(population, size=k, replace=population < k).astype(np.int64)
