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

Everything here but :func:`read_pool_windows` and
:class:`PooledFeatureReader` is a pure function of numpy arrays. Boxes are float32
``(x1, y1, x2, y2)`` in the internal 0-based continuous pixel-edge convention.
"""
from __future__ import annotations

import collections
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
    overlaps: np.ndarray
    assigned_gt: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_difficult: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def read_features(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Pooled feature rows of this item, in its storage dtype (see :func:`read_feature_rows`)."""
        import h5py

        with h5py.File(self.path, "r") as f:
            return read_feature_rows(f["features"], rows)


_META_DATASETS = ("boxes", "is_gt", "gt_label", "overlaps", "assigned_gt", "gt_boxes", "gt_labels", "gt_difficult")


def read_pool_windows(path: Path, image_id: str | None = None) -> PoolWindows:
    """Read the window metadata of one pool item (not its features)."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
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
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["boxes"].shape[0])


NORM_SEED = 3  # R-CNN's seed_rand() seed for its feature statistics


def mean_feature_norm(paths: Sequence[Path], transform: Callable[[np.ndarray], np.ndarray], seed: int = NORM_SEED,
                      max_images: int = 200, per_image: int = 200, progress=None) -> tuple[float, int]:
    """Mean L2 norm of ``transform(pooled rows)`` over a seeded :func:`norm_sample` of windows.

    Args:
        paths: the pool items.
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
    import h5py

    wrap = progress or (lambda iterable, total: iterable)
    counts = [count_windows(p) for p in wrap(paths, total=len(paths))]
    sample = norm_sample(np.random.default_rng(seed), counts, max_images, per_image)
    norms = []
    for image, rows in wrap(sample, total=len(sample)):
        with h5py.File(paths[image], "r") as f:
            pooled = read_feature_rows(f["features"], rows)
        norms.append(np.linalg.norm(np.asarray(transform(pooled), dtype=np.float64), axis=1))
    if not norms:
        raise ValueError("no windows in the pool items: cannot estimate the mean feature norm")
    norms = np.concatenate(norms)
    return float(norms.mean()), int(norms.size)


@dataclasses.dataclass(frozen=True, eq=False)
class WindowSet:
    """Selected windows of a whole split, as parallel flat arrays.

    Attributes:
        image: int32 ``[M]`` index of the image (into the stage's image list).
        row: int32 ``[M]`` row in that image's pool item.
        label: int16 ``[M]`` training label.
    """

    image: np.ndarray
    row: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @staticmethod
    def concat(parts: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> "WindowSet":
        """From ``[(image_index, rows, labels)]`` per image."""
        if not parts:
            return WindowSet(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int16))
        image = np.concatenate([np.full(len(r), i, np.int32) for i, r, _ in parts])
        row = np.concatenate([np.asarray(r, np.int32) for _, r, _ in parts])
        label = np.concatenate([np.asarray(lab, np.int16) for _, _, lab in parts])
        return WindowSet(image, row, label)


@dataclasses.dataclass(frozen=True)
class MiniBatch:
    """One fine-tuning mini-batch: positives first, then negatives.

    Attributes:
        fg: int64 indices into the positive :class:`WindowSet`; bg: into the negative one.
        labels: int64 ``[len(fg) + len(bg)]``: the positives' labels, then zeros.
    """

    fg: np.ndarray
    bg: np.ndarray
    labels: np.ndarray


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
    """

    def __init__(self, positives: WindowSet, negatives: WindowSet, batch_size: int, fg_fraction: float,
                 seed: int):
        self.positives = positives
        self.negatives = negatives
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.n_fg, self.n_bg = batch_counts(self.batch_size, fg_fraction, len(positives), len(negatives))

    def batch(self, iteration: int) -> MiniBatch:
        rng = np.random.default_rng([self.seed, int(iteration)])
        fg = _draw(rng, len(self.positives), self.n_fg)
        bg = _draw(rng, len(self.negatives), self.n_bg)
        labels = np.concatenate([self.positives.label[fg].astype(np.int64), np.zeros(len(bg), np.int64)])
        return MiniBatch(fg=fg, bg=bg, labels=labels)


def _draw(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    if k == 0:
        return np.empty(0, np.int64)
    return rng.choice(population, size=k, replace=population < k).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# reading selected feature rows


class PooledFeatureReader:
    """Pooled feature rows of selected windows, read from the pool items.

    Two modes, chosen by the size of the selection:

    * **in memory**: when every selected row fits in ``max_cache_bytes`` (storage dtype), all of
      them are read once (one pass over the items) and served by indexing;
    * **streaming**: otherwise rows are read per request, grouped by image, through a bounded
      LRU of open HDF5 files. Callers ask for many mini-batches at once (see
      :meth:`chunk_batches`) so that each file is visited once per chunk.

    Both return the same values, so the mode never changes a result.

    Args:
        paths: the pool item of each image index.
        windows: the selected windows (image index, row); requests index into it.
        max_cache_bytes: memory the in-memory copy may take.
        max_open_files: size of the LRU of open files in streaming mode.
    """

    def __init__(self, paths: Sequence[Path], windows: WindowSet, max_cache_bytes: int,
                 max_open_files: int = 32, progress=None):
        import h5py

        self.paths = [Path(p) for p in paths]
        self.windows = windows
        self.max_open_files = max(1, int(max_open_files))
        self._open: collections.OrderedDict[int, h5py.File] = collections.OrderedDict()
        self.dim, self.dtype = _feature_layout(self.paths, windows)
        self.row_bytes = self.dim * np.dtype(self.dtype).itemsize
        self.cache: np.ndarray | None = None
        if len(windows) * self.row_bytes <= max_cache_bytes:
            self.cache = self._read(np.arange(len(windows)), progress=progress)

    @property
    def in_memory(self) -> bool:
        return self.cache is not None

    def chunk_batches(self, batch_rows: int, max_cache_bytes: int, limit: int = 500) -> int:
        """How many mini-batches of ``batch_rows`` rows fit in ``max_cache_bytes`` (1 to ``limit``):
        the size of one streaming request."""
        return int(min(limit, max(1, max_cache_bytes // max(1, batch_rows * self.row_bytes))))

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``[len(indices), D]`` (storage dtype) of the selected windows ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.cache is not None:
            return self.cache[indices]
        return self._read(indices)

    def _read(self, indices: np.ndarray, progress=None) -> np.ndarray:
        out = np.empty((len(indices), self.dim), dtype=self.dtype)
        if len(indices) == 0:
            return out
        images = self.windows.image[indices]
        rows = self.windows.row[indices]
        order = np.argsort(images, kind="stable")
        starts = np.flatnonzero(np.r_[True, images[order][1:] != images[order][:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], len(order)]))
        if progress is not None:
            bounds = progress(bounds, total=len(bounds))
        for start, stop in bounds:
            where = order[start:stop]
            image = int(images[where[0]])
            out[where] = read_feature_rows(self._file(image)["features"], rows[where])
        return out

    def _file(self, image: int):
        import h5py

        f = self._open.pop(image, None)
        if f is None:
            if len(self._open) >= self.max_open_files:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
            f = h5py.File(self.paths[image], "r")
        self._open[image] = f
        return f

    def close(self) -> None:
        while self._open:
            _, f = self._open.popitem()
            f.close()

    def __enter__(self) -> "PooledFeatureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _feature_layout(paths: Sequence[Path], windows: WindowSet) -> tuple[int, np.dtype]:
    """(D, storage dtype) of the ``features`` datasets, read from the first needed item."""
    import h5py

    if not paths:
        raise ValueError("no pool items to read features from")
    first = int(windows.image[0]) if len(windows) else 0
    with h5py.File(paths[first], "r") as f:
        ds = f["features"]
        return int(ds.shape[1]), ds.dtype
