"""The pooled feature rows of windows, for every consumer: pooled on the fly or read when stored.

SPP-net's point is that a window's fixed-length vector is cheap to make from the conv5 map of
its image (about 0.06 s for 2,000 windows on one core), so per-window vectors need not live on
disk: at 12,800-d float16 they take ~51 MB per VOC image, 500 GB for VOC 2007. The pool stage
therefore writes a *window table* per image (boxes, labels, the chosen scale, the conv5 cells,
overlaps; :mod:`sppcli.detector.windows`), and fine-tuning, the SVMs, box regression and detection
ask :class:`PooledFeatures` for the rows they need. When the pool stage was told to store the
vectors (``pool.store_features = true``) the same call reads them from the pool item instead.

Both ways give the same bytes: :func:`pool_rows` is the one function that makes a pooled row
(the pool stage uses it to store them), max pooling is exact, and pooling a subset of the
windows of a map gives each row exactly the value it has when all are pooled together.

Maps are read through a bounded cache (``map_cache_bytes``, :class:`MapCache`): fine-tuning draws
mini-batches from every image of the split, so it keeps the split's maps in memory when they fit
(VOC 2007 trainval at one scale is ~6 GB of float16) and otherwise reads the others once per chunk
of mini-batches (see :meth:`PooledFeatures.gather`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sppcli.ops.spp_pool import pooled_dim, spp_pool

_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def pool_rows(fmap: np.ndarray, cells: np.ndarray, levels: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Pooled vectors of windows of one map.

    Args:
        fmap: ``[C, H, W]`` conv5 map (any float dtype).
        cells: int ``[N, 4]`` inclusive cell windows ``(x1, y1, x2, y2)`` on ``fmap``.
        levels: pyramid levels in output order.
        dtype: numpy dtype of the result.
    Returns:
        ``[N, C * sum(n * n)]`` of ``dtype``.
    """
    # Maxima are exact in any float dtype, so a float16 map is pooled as it is (half the memory
    # traffic of a float32 copy), and the result cast by torch (which uses the CPU's conversion
    # instructions; numpy's float32 -> float16 cast is ~10x slower and rounds the same way).
    fmap = np.asarray(fmap)
    pool_dtype = np.float16 if fmap.dtype == np.float16 else np.float32
    fmap_t = torch.from_numpy(np.asarray(fmap, dtype=pool_dtype))
    cells_t = torch.from_numpy(np.asarray(cells, dtype=np.int64).reshape(-1, 4))
    return spp_pool(fmap_t, cells_t, levels).to(_TORCH[np.dtype(dtype)]).numpy()


class MapCache:
    """Conv5 maps by ``(image_id, scale_index, flip)``, kept while they fit in ``budget`` bytes.

    ``load(image_id, scale_index, flip)`` reads a map from disk (``flip``: of the horizontally
    flipped image). Once the budget is full, new maps are
    read but not kept: consumers visit the images of a split in the same order again and again
    (a scan), where least-recently-used eviction would throw out every map just before it is
    needed, and keeping the first ones serves a ``budget / total`` share of the reads. A budget of
    0 caches nothing.
    """

    def __init__(self, load: Callable[[str, int, bool], np.ndarray], budget: int = 0):
        self.load = load
        self.budget = int(budget)
        self.bytes = 0
        self._maps: dict[tuple[str, int, bool], np.ndarray] = {}
        self.reads = 0

    def get(self, image_id: str, scale_index: int, flip: bool = False) -> np.ndarray:
        key = (image_id, int(scale_index), bool(flip))
        fmap = self._maps.get(key)
        if fmap is None:
            fmap = self.load(*key)
            self.reads += 1
            if self.bytes + fmap.nbytes <= self.budget:
                self._maps[key] = fmap
                self.bytes += fmap.nbytes
        return fmap


class PooledFeatures:
    """Pooled rows of the windows of one split.

    Args:
        levels: the pool stage's pyramid levels (output order); dtype: its storage dtype.
        channels: C of the conv5 maps.
        load_map: ``(image_id, scale_index, flip) -> [C, H, W]`` map of the features artifact.
        stored_item: ``image_id -> Path`` of the pool item holding a ``features`` dataset, or
            None when the vectors were not stored (then they are pooled from the maps). Windows
            of flipped images, or at another scale than their chosen one (fine-tuning's
            augmentations), are always pooled from the maps.
        map_cache_bytes: how many bytes of maps to keep in memory between calls.
    """

    def __init__(self, levels: Sequence[int], dtype, channels: int, load_map: Callable[[str, int, bool], np.ndarray],
                 stored_item: Callable[[str], Path] | None = None, map_cache_bytes: int = 0):
        self.levels = [int(n) for n in levels]
        self.dtype = np.dtype(dtype)
        self.dim = pooled_dim(int(channels), self.levels)
        self.stored_item = stored_item
        self.maps = MapCache(load_map, map_cache_bytes)

    @property
    def stored(self) -> bool:
        return self.stored_item is not None

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def rows(self, image_id: str, rows: np.ndarray, scale_index: np.ndarray, cells: np.ndarray,
             flip: bool = False, stored: bool = True) -> np.ndarray:
        """``[len(rows), D]`` pooled vectors of one image's windows ``rows`` (any order, repeats
        allowed), at the scales and cells given alongside (the window table's, unless
        fine-tuning moved them); ``flip``: on the flipped image's maps; ``stored``: the scales and
        cells are the table's, so stored vectors may answer."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.stored_item is not None and stored and not flip:
            import h5py

            from sppcli.detector.windows import read_feature_rows

            with h5py.File(self.stored_item(image_id), "r") as f:
                return read_feature_rows(f["features"], rows)
        scale_index = np.asarray(scale_index).reshape(-1)
        cells = np.asarray(cells).reshape(-1, 4)
        out = np.empty((rows.size, self.dim), dtype=self.dtype)
        for s in np.unique(scale_index):
            where = np.flatnonzero(scale_index == s)
            out[where] = pool_rows(self.maps.get(image_id, int(s), flip), cells[where], self.levels, self.dtype)
        return out

    def window_rows(self, windows, rows: np.ndarray | None = None) -> np.ndarray:
        """:meth:`rows` of a :class:`~sppcli.detector.windows.PoolWindows` table (all rows if None)."""
        rows = np.arange(len(windows)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        return self.rows(windows.image_id, rows, windows.scale_index[rows], windows.cells[rows])

    def gather(self, image_ids: Sequence[str], image: np.ndarray, row: np.ndarray, scale_index: np.ndarray,
               cells: np.ndarray, flip: np.ndarray | None = None, stored: bool = True, progress=None,
               out: np.ndarray | None = None) -> np.ndarray:
        """Rows of windows of many images, ``[M, D]`` in request order.

        ``image`` int ``[M]`` indexes ``image_ids``; ``row``, ``scale_index``, ``cells`` and
        ``flip`` (bool ``[M]``, None: no flips) describe each requested window; ``stored`` as in
        :meth:`rows`. Requests are grouped by image (and flip) so each map is read, or taken from
        the cache, once per call. ``out``: an ``[M, D]`` array of the storage dtype to fill and
        return instead of a new one (a caller assembling one large block avoids a second copy).
        """
        image = np.asarray(image, dtype=np.int64).reshape(-1)
        flip = np.zeros(image.size, bool) if flip is None else np.asarray(flip, bool).reshape(-1)
        if out is None:
            out = np.empty((image.size, self.dim), dtype=self.dtype)
        elif out.shape != (image.size, self.dim) or out.dtype != self.dtype:
            raise ValueError(f"out must be {(image.size, self.dim)} {self.dtype}, got {out.shape} {out.dtype}")
        if image.size == 0:
            return out
        group = image * 2 + flip
        order = np.argsort(group, kind="stable")
        sorted_groups = group[order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], image.size]))
        if progress is not None:
            bounds = progress(bounds, total=len(bounds))
        for start, stop in bounds:
            where = order[start:stop]
            first = where[0]
            out[where] = self.rows(image_ids[int(image[first])], row[where], scale_index[where], cells[where],
                                   flip=bool(flip[first]), stored=stored)
        return out
