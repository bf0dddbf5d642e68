"""The pooled-feature reader: on-the-fly rows equal a slow loop and the stored rows, bit for bit."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from sppcli.detector.pooled_features import MapCache, PooledFeatures, pool_rows
from sppcli.ops.spp_pool import spp_pool_reference

LEVELS = (1, 2, 3, 6)


def _maps(seed: int, channels: int = 5) -> list[np.ndarray]:
    """Two scales of ReLU-like float16 maps (many exact zeros, as conv5 has)."""
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.standard_normal((channels, h, w)), 0).astype(np.float16) for h, w in ((7, 9), (13, 17))]


def _cells(rng, count: int, height: int, width: int) -> np.ndarray:
    x = np.sort(rng.integers(0, width, (count, 2)), axis=1)
    y = np.sort(rng.integers(0, height, (count, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.int32)


def _windows(seed: int, maps, count: int = 40):
    rng = np.random.default_rng(seed)
    scale = rng.integers(0, len(maps), count).astype(np.int8)
    cells = np.zeros((count, 4), np.int32)
    for s, fmap in enumerate(maps):
        rows = np.flatnonzero(scale == s)
        cells[rows] = _cells(rng, rows.size, fmap.shape[1], fmap.shape[2])
    return scale, cells


def _reference(fmap: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The definition, in float64: one adaptive max pooling per window and level."""
    return spp_pool_reference(torch.from_numpy(fmap.astype(np.float64)), torch.from_numpy(cells).long(),
                              LEVELS).numpy()


def test_pool_rows_equals_the_slow_loop_in_any_dtype():
    fmap = _maps(0)[1]
    cells = _cells(np.random.default_rng(1), 25, fmap.shape[1], fmap.shape[2])
    want = _reference(fmap, cells)
    for dtype in (np.float16, np.float32):
        got = pool_rows(fmap, cells, LEVELS, np.dtype(dtype))
        assert got.dtype == dtype and np.array_equal(got.astype(np.float64), want)


def test_on_the_fly_rows_equal_stored_rows_bit_for_bit(tmp_path):
    images = {f"im{i}": _maps(i) for i in range(3)}
    tables = {}
    for image_id, maps in images.items():
        scale, cells = _windows(hash(image_id) % 1000, maps)
        # What the pool stage stores with store_features: every row, pooled per scale at once.
        stored = np.empty((len(scale), 5 * 50), np.float16)
        for s, fmap in enumerate(maps):
            rows = np.flatnonzero(scale == s)
            stored[rows] = pool_rows(fmap, cells[rows], LEVELS, np.dtype(np.float16))
        with h5py.File(tmp_path / f"{image_id}.h5", "w") as f:
            f["features"] = stored
        tables[image_id] = (scale, cells, stored)

    reads = []

    def load(image_id, s, flip=False):
        reads.append((image_id, s))
        return images[image_id][s]

    on_the_fly = PooledFeatures(LEVELS, "float16", 5, load)
    from_disk = PooledFeatures(LEVELS, "float16", 5, load, stored_item=lambda i: tmp_path / f"{i}.h5")
    assert not on_the_fly.stored and from_disk.stored and on_the_fly.dim == 250
    rng = np.random.default_rng(7)
    for image_id, (scale, cells, stored) in tables.items():
        rows = rng.integers(0, len(scale), 30)  # any order, with repeats
        a = on_the_fly.rows(image_id, rows, scale[rows], cells[rows])
        b = from_disk.rows(image_id, rows, scale[rows], cells[rows])
        assert a.dtype == b.dtype == np.float16
        assert a.tobytes() == b.tobytes() == stored[rows].tobytes()
        for k, r in enumerate(rows):
            np.testing.assert_array_equal(a[k].astype(np.float64), _reference(images[image_id][scale[r]], cells[r:r + 1])[0])

    # gather: many images in one request, answered in request order, each map read once per call
    ids = list(tables)
    image = rng.integers(0, len(ids), 60)
    row = np.array([rng.integers(0, len(tables[ids[i]][0])) for i in image])
    scale = np.array([tables[ids[i]][0][r] for i, r in zip(image, row)])
    cells = np.stack([tables[ids[i]][1][r] for i, r in zip(image, row)])
    reads.clear()
    got = on_the_fly.gather(ids, image, row, scale, cells)
    want = np.stack([tables[ids[i]][2][r] for i, r in zip(image, row)])
    assert got.tobytes() == want.tobytes()
    assert len(reads) == len(set(zip(image.tolist(), scale.tolist())))
    assert on_the_fly.gather(ids, np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), np.zeros((0, 4))).shape == (0, 250)
    # into a caller's block (the in-memory fine-tuning cache): the same bytes, in that array
    block = np.full((len(image) + 2, 250), np.nan, np.float16)
    filled = on_the_fly.gather(ids, image, row, scale, cells, out=block[1:-1])
    assert filled.base is block or filled.base is block.base
    assert block[1:-1].tobytes() == want.tobytes() and np.isnan(block[[0, -1]]).all()
    with pytest.raises(ValueError, match="out must be"):
        on_the_fly.gather(ids, image, row, scale, cells, out=np.empty((len(image), 250), np.float32))


def test_map_cache_keeps_the_first_maps_that_fit():
    maps = {(i, 0): np.zeros(100, np.float16) for i in range(5)}  # 200 bytes each
    loads = []

    def load(image_id, s, flip=False):
        loads.append(image_id)
        return maps[(image_id, s)]

    cache = MapCache(load, budget=450)
    for _ in range(3):  # a scan over all images, three times
        for i in range(5):
            assert cache.get(i, 0) is maps[(i, 0)]
    # images 0 and 1 stay (400 bytes); 2, 3, 4 are read on every scan
    assert loads == [0, 1, 2, 3, 4] + [2, 3, 4] * 2 and cache.bytes == 400 and cache.reads == 11
    nothing = MapCache(load, budget=0)
    nothing.get(0, 0), nothing.get(0, 0)
    assert nothing.bytes == 0 and nothing.reads == 2
