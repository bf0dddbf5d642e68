"""Spatial pyramid max pooling of many windows of one feature map.

:func:`spp_pool` returns, for each window, exactly (bit for bit) what this loop returns::

    torch.cat([F.adaptive_max_pool2d(fmap[:, y1:y2 + 1, x1:x2 + 1], n).flatten() for n in levels])

(:func:`spp_pool_reference` is that loop), without ``len(levels)`` small pooling calls per
window. Two implementations:

* On the CPU (float16 and float32 maps, numba installed): a compiled kernel, see "CPU kernel"
  below. It scans each window's finest bins on the channels-last map and writes each output
  row once, in place: about 4x the time of one write (a fill) of the output, float32 and
  float16 alike (bench/bench_spp_pool.py), against 5.5x and 8-10x for the torch path.
* Otherwise (CUDA maps, float64, no numba): torch operations, as follows.

* Bins follow adaptive pooling: over a window of ``L`` cells, bin ``i`` of ``n`` covers
  ``[floor(i * L / n), ceil((i + 1) * L / n))``. Bins never come out empty, even when
  ``n > L`` (then neighbouring bins repeat cells, as torch does).
* A 2D sparse table holds the max of every ``2^ky x 2^kx`` block of the map, so the max of any
  rectangle is the max of four (possibly overlapping) power-of-two blocks: four row gathers of
  a channels-last table per bin. Max is exact, so overlap and order do not change the result.
  Where a bin side is itself a power of two its two blocks coincide; most bins of proposal
  windows are 1-2 cells wide, so the extra blocks are gathered only for the bins that need
  them (or for all bins when most do).
* A level ``n`` whose multiple ``m`` is also requested is not looked up: bin ``i`` of ``n``
  is exactly the union of bins ``i*m/n .. (i+1)*m/n - 1`` of ``m`` (the floor/ceil edges
  coincide), so it is the max over those ``(m/n)^2`` finer bins. With levels (1, 2, 3, 6) only
  the 6 x 6 level touches the table.
* Windows that map to the same cells are pooled once.
* Windows are processed in chunks small enough that a chunk's bins stay in cache from the
  gathers to the channel-major copy into the output.

The code is device-agnostic (CPU or CUDA tensors; any floating dtype that ``torch.maximum``
and ``index_select`` support on that device, float32 and float16 included).

Bit-identity caveat: when a bin's maximum is zero and the bin holds both ``+0.0`` and ``-0.0``,
the sign of the returned zero may differ from adaptive pooling's (the values compare equal;
the CPU kernel returns ``+0.0``). NaNs propagate (a bin containing NaN yields NaN), as in
adaptive pooling; the CPU kernel may return another NaN of the bin than the loop does (its
payload and sign can differ).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_LEVELS", "pooled_dim", "spp_pool", "spp_pool_reference"]

#: The paper's "SPP-net6" pyramid: 1x1, 2x2, 3x3, 6x6 bins (50 bins per channel).
DEFAULT_LEVELS: tuple[int, ...] = (1, 2, 3, 6)

# Bytes of finest-level bin features per chunk of windows. Small enough that a chunk's
# buffers stay in a core's L2 cache, large enough to amortise the ~15 operations per chunk
# (on a 2-core Xeon with 2 MB L2: 0.25 to 1 MB measured alike, 2 MB 5% slower).
_CHUNK_BYTES = 1024 * 1024


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _new_large(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uninitialised tensor of ``like``'s dtype and device.

    On the CPU it is backed by a numpy array: numpy asks Linux for transparent huge pages on
    large allocations, which halves the page-fault cost of first touching a ~100 MB output
    (torch's CPU allocator does not). Elsewhere a plain ``new_empty``.
    """
    if like.device.type == "cpu" and like.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[like.dtype]))
    return like.new_empty(shape)


def pooled_dim(channels: int, levels: Sequence[int] = DEFAULT_LEVELS) -> int:
    """Length of one window's pooled feature: ``channels * sum(n * n for n in levels)``."""
    return channels * sum(n * n for n in levels)


def _check_inputs(fmap: Tensor, cells: Tensor, levels: Sequence[int]) -> None:
    if fmap.dim() != 3:
        raise ValueError(f"fmap must have shape [C, H, W], got {tuple(fmap.shape)}")
    if cells.dim() != 2 or cells.shape[1] != 4:
        raise ValueError(f"cells must have shape [N, 4], got {tuple(cells.shape)}")
    if cells.dtype.is_floating_point or cells.dtype == torch.bool:
        raise ValueError(f"cells must be an integer tensor, got {cells.dtype}")
    if len(levels) == 0 or any(int(n) != n or n < 1 for n in levels):
        raise ValueError(f"levels must be positive integers, got {tuple(levels)}")
    if cells.shape[0] == 0:
        return
    height, width = fmap.shape[1:]
    x1, y1, x2, y2 = cells.unbind(1)
    invalid = (x1 < 0) | (y1 < 0) | (x2 < x1) | (y2 < y1) | (x2 >= width) | (y2 >= height)
    if bool(invalid.any()):
        first = int(invalid.nonzero()[0, 0])
        raise ValueError(
            f"cells[{first}] = {cells[first].tolist()} is not an inclusive window of a "
            f"{height} x {width} map (need 0 <= x1 <= x2 < W, 0 <= y1 <= y2 < H)"
        )


def spp_pool_reference(fmap: Tensor, cells: Tensor, levels: Sequence[int] = DEFAULT_LEVELS) -> Tensor:
    """The slow, obviously correct definition of :func:`spp_pool` (one loop per window).

    Args and return value as :func:`spp_pool`.
    """
    _check_inputs(fmap, cells, levels)
    channels = fmap.shape[0]
    if cells.shape[0] == 0:
        return fmap.new_empty((0, pooled_dim(channels, levels)))
    rows = []
    for x1, y1, x2, y2 in cells.tolist():
        window = fmap[:, y1:y2 + 1, x1:x2 + 1]
        rows.append(torch.cat([F.adaptive_max_pool2d(window, n).flatten() for n in levels]))
    return torch.stack(rows)


def _bin_edges(starts: Tensor, lengths: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Adaptive-pooling bins of ``n`` per window: absolute ``[lo, hi)`` cell ranges, ``[N, n]``."""
    i = torch.arange(n, device=starts.device)
    lo = torch.div(i[None, :] * lengths[:, None], n, rounding_mode="floor")
    hi = torch.div((i[None, :] + 1) * lengths[:, None] + (n - 1), n, rounding_mode="floor")
    return starts[:, None] + lo, starts[:, None] + hi


def _floor_log2_table(longest: int, device: torch.device) -> Tensor:
    """``table[k] = floor(log2(k))`` for ``1 <= k <= longest`` (entry 0 unused), exact ints."""
    values = [0] + [k.bit_length() - 1 for k in range(1, longest + 1)]
    return torch.tensor(values, dtype=torch.long, device=device)


def _plan_levels(levels: Sequence[int]) -> dict[int, int | None]:
    """For each distinct level: the finer requested level it is reduced from, or None when it
    must be looked up in the sparse table. The smallest multiple is used (fewest bins to reduce);
    levels are resolved coarse-from-fine, so chains like 1 <- 2 <- 6 work."""
    distinct = sorted(set(int(n) for n in levels), reverse=True)
    plan: dict[int, int | None] = {}
    for n in distinct:
        multiples = [m for m in plan if m % n == 0]
        plan[n] = min(multiples) if multiples else None
    return plan


def _build_table(fmap_hwc: Tensor, depth_y: int, depth_x: int) -> Tensor:
    """Sparse table ``[depth_y, depth_x, H, W, C]``: entry ``[ky, kx, y, x]`` is the max of
    ``fmap[y:y + 2^ky, x:x + 2^kx]`` per channel, defined where the block fits in the map.

    Entries whose block would leave the map are never read and are left uninitialised.
    """
    height, width, channels = fmap_hwc.shape
    table = _new_large(fmap_hwc, (depth_y, depth_x, height, width, channels))
    table[0, 0] = fmap_hwc
    for kx in range(1, depth_x):
        half = 1 << (kx - 1)
        valid = width - (1 << kx) + 1
        previous = table[0, kx - 1]
        torch.maximum(previous[:, :valid], previous[:, half:half + valid], out=table[0, kx, :, :valid])
    for ky in range(1, depth_y):
        half = 1 << (ky - 1)
        valid = height - (1 << ky) + 1
        previous = table[ky - 1]
        torch.maximum(previous[:, :valid], previous[:, half:half + valid], out=table[ky, :, :valid])
    return table


@dataclass
class _Lookup:
    """Table-row indices answering every bin of one pyramid level, one entry per chunk of
    windows; bins are flat over (window, i, j) within their chunk.

    Every bin reads its ``(y_lo, x_lo)`` block. A corner block that most bins need is gathered
    for all bins (``dense_rows``); the others are gathered only for the bins that need them
    (``sparse_rows``, ordered by bin) and max-scattered onto those bins (``sparse_bins``, the
    bin of each row expanded over the channels, as ``scatter_reduce_`` wants).
    """

    first_rows: list[Tensor]  # per chunk [count * n * n]
    dense_rows: list[list[Tensor]]  # per chunk, per corner [count * n * n]
    sparse_rows: list[Tensor]  # per chunk [K]
    sparse_bins: list[Tensor]  # per chunk [K, C]


# Above this fraction of bins needing a corner block, gathering that corner for every bin
# and taking one elementwise maximum is cheaper than gathering and max-scattering only the
# bins that need it.
_SPARSE_LIMIT = 0.5


def _plan_lookup(
    y_lo: Tensor, y_hi: Tensor, x_lo: Tensor, x_hi: Tensor,
    log2: Tensor, depth_x: int, height: int, width: int, chunk_sizes: list[int], channels: int,
) -> _Lookup:
    """Corner rows of every bin of one level; ``y_lo`` etc. are ``[N, n]`` absolute edges,
    ``log2`` the floor-log2 table, ``depth_x`` the table's x depth, ``chunk_sizes`` the windows
    of each chunk (consecutive, summing to ``N``).

    A bin ``[y_lo, y_hi) x [x_lo, x_hi)`` is the union of the blocks of size
    ``2^ky x 2^kx`` (``2^k`` the largest power of two not above the side) anchored at
    ``y_lo`` or ``y_hi - 2^ky`` and ``x_lo`` or ``x_hi - 2^kx``. When a side is itself a power
    of two both anchors coincide, so most small bins need one block, not four.
    """
    count, n = y_lo.shape
    ky, kx = log2[y_hi - y_lo], log2[x_hi - x_lo]
    y_other, x_other = y_hi - (1 << ky), x_hi - (1 << kx)
    plane = (ky[:, :, None] * depth_x + kx[:, None, :]) * (height * width)

    def rows_at(ys: Tensor, xs: Tensor) -> Tensor:
        return (plane + ys[:, :, None] * width + xs[:, None, :]).reshape(-1)

    y_split = (y_other != y_lo)[:, :, None].expand(count, n, n)
    x_split = (x_other != x_lo)[:, None, :].expand(count, n, n)
    bins_per_chunk = [size * n * n for size in chunk_sizes]
    dense_rows, sparse_rows, sparse_needs = [], [], []
    for needs, ys, xs in ((y_split, y_other, x_lo), (x_split, y_lo, x_other), (y_split & x_split, y_other, x_other)):
        needs = needs.reshape(-1)
        needed = int(needs.sum())
        if needed == 0:
            continue
        corner = rows_at(ys, xs)
        if needed > _SPARSE_LIMIT * needs.numel():
            dense_rows.append(corner.split(bins_per_chunk))
        else:
            sparse_rows.append(corner)
            sparse_needs.append(needs)
    chunk_count = len(chunk_sizes)
    if sparse_rows:
        # Interleaved per bin, so the scatter walks each chunk's bins in order.
        needs = torch.stack(sparse_needs, dim=1)
        rows = torch.stack(sparse_rows, dim=1)[needs]
        bins = needs.nonzero()[:, 0]
        first_bins = torch.tensor([0] + bins_per_chunk[:-1], device=bins.device).cumsum(0)
        chunk_of_bin = torch.searchsorted(first_bins, bins, right=True) - 1
        sizes = torch.bincount(chunk_of_bin, minlength=chunk_count).tolist()
        local_bins = (bins - first_bins[chunk_of_bin])[:, None].expand(-1, channels)
        sparse_rows, sparse_bins = rows.split(sizes), local_bins.split(sizes)
    else:
        sparse_rows = sparse_bins = [y_lo.new_empty((0,))] * chunk_count
    return _Lookup(
        first_rows=rows_at(y_lo, x_lo).split(bins_per_chunk),
        dense_rows=[list(corners) for corners in zip(*dense_rows)] if dense_rows else [[]] * chunk_count,
        sparse_rows=list(sparse_rows), sparse_bins=list(sparse_bins),
    )


def _pool_windows(
    fmap: Tensor, cells: Tensor, levels: Sequence[int], out: Tensor | None = None, out_rows: Tensor | None = None,
) -> Tensor:
    """Pooled features of ``cells`` (already validated, N > 0).

    Without ``out``: returns a new ``[N, D]`` tensor, row ``k`` for ``cells[k]``. With ``out``
    (``[M, D]``) and ``out_rows`` (``[N]``, distinct, increasing): writes the row of ``cells[k]``
    to ``out[out_rows[k]]`` and returns ``out``.

    Windows are processed in chunks whose buffers stay in cache, each writing one contiguous
    run of output rows. Every operand of every per-chunk operation is a view made once here:
    the chunks are small, so creating views per chunk would cost as much as the arithmetic.
    """
    channels, height, width = fmap.shape
    device = fmap.device
    total = cells.shape[0]
    plan = _plan_levels(levels)
    looked_up = [n for n, source in plan.items() if source is None]
    finest = max(n * n for n in looked_up)
    chunk = min(total, max(1, _CHUNK_BYTES // (finest * channels * fmap.element_size())))

    edges, longest_y, longest_x = _level_edges(cells, looked_up)
    depth_y, depth_x = longest_y.bit_length(), longest_x.bit_length()
    log2 = _floor_log2_table(max(longest_y, longest_x), device)
    chunks = _plan_chunks(total, chunk, out_rows)
    chunk_sizes = [count for _, count, _ in chunks]
    lookups = {n: _plan_lookup(*edges[n], log2, depth_x, height, width, chunk_sizes, channels) for n in looked_up}

    table = _build_table(fmap.permute(1, 2, 0).contiguous(), depth_y, depth_x)
    rows = table.view(-1, channels)

    # Channels-last bin maxima of one chunk per level ([chunk, n, n, C]), and the elementwise
    # maxima that derive the merged levels from finer ones (run fine to coarse).
    bins = {n: fmap.new_empty((chunk, n, n, channels)) for n in looked_up}
    merge_steps: list[tuple[Tensor, Tensor, Tensor]] = []
    for n in sorted(plan, reverse=True):
        if plan[n] is not None:
            bins[n] = _plan_merge(bins[plan[n]], plan[n] // n, merge_steps)
    flat_bins = {n: bins[n].view(-1, channels) for n in looked_up}
    extra = fmap.new_empty((3 * chunk * finest, channels))

    dim = pooled_dim(channels, levels)
    if out is None:
        out = _new_large(fmap, (total, dim))

    on_numpy = fmap.device.type == "cpu" and fmap.dtype in _NUMPY_DTYPES
    copy = np.copyto if on_numpy else Tensor.copy_
    transposes = _channel_major_copies(out, bins, levels, channels, on_numpy)

    for chunk_index, (_, count, out_start) in enumerate(chunks):
        full = count == chunk
        for n, lookup in lookups.items():
            pooled = flat_bins[n] if full else flat_bins[n][:count * n * n]
            torch.index_select(rows, 0, lookup.first_rows[chunk_index], out=pooled)
            for corner_rows in lookup.dense_rows[chunk_index]:
                more = extra[:corner_rows.shape[0]]
                torch.index_select(rows, 0, corner_rows, out=more)
                torch.maximum(pooled, more, out=pooled)
            corner_rows = lookup.sparse_rows[chunk_index]
            if corner_rows.shape[0]:
                more = extra[:corner_rows.shape[0]]
                torch.index_select(rows, 0, corner_rows, out=more)
                pooled.scatter_reduce_(0, lookup.sparse_bins[chunk_index], more, "amax")
        # On a short last chunk the merges also run over stale rows past count; never copied out.
        for first, second, merged in merge_steps:
            torch.maximum(first, second, out=merged)
        for destination, source in transposes:
            copy(destination[out_start:out_start + count], source if full else source[:count])
    return out


def _level_edges(cells: Tensor, levels: Sequence[int]) -> tuple[dict[int, tuple[Tensor, ...]], int, int]:
    """Bin edges ``(y_lo, y_hi, x_lo, x_hi)`` (each ``[N, n]``) of every level, and the longest
    bin side along y and x (which sets the sparse table's depth)."""
    x_start, y_start = cells[:, 0], cells[:, 1]
    x_len = cells[:, 2] - x_start + 1
    y_len = cells[:, 3] - y_start + 1
    edges = {}
    longest_y = longest_x = 1
    for n in levels:
        y_lo, y_hi = _bin_edges(y_start, y_len, n)
        x_lo, x_hi = _bin_edges(x_start, x_len, n)
        edges[n] = (y_lo, y_hi, x_lo, x_hi)
        longest_y = max(longest_y, int((y_hi - y_lo).max()))
        longest_x = max(longest_x, int((x_hi - x_lo).max()))
    return edges, longest_y, longest_x


def _channel_major_copies(out: Tensor, bins: dict[int, Tensor], levels: Sequence[int], channels: int,
                          on_numpy: bool) -> list[tuple]:
    """Per level: the channel-major destination (a ``[rows, C, n, n]`` view of ``out``) and the
    chunk's channels-last bins permuted to match.

    On the CPU both are numpy views: numpy's strided copy is faster than torch's for these
    batched channel transposes, and slicing a numpy view per chunk costs a tenth of slicing a
    tensor.
    """
    transposes = []
    offset = 0
    for n in levels:
        span = slice(offset, offset + channels * n * n)
        offset = span.stop
        destination, source = out[:, span].view(out.shape[0], channels, n, n), bins[n].permute(0, 3, 1, 2)
        transposes.append((destination.numpy(), source.numpy()) if on_numpy else (destination, source))
    return transposes


def _plan_chunks(total: int, chunk: int, out_rows: Tensor | None) -> list[tuple[int, int, int]]:
    """``(first window, window count, first output row)`` of each chunk: at most ``chunk``
    consecutive windows whose output rows (``out_rows``, increasing, or the identity when
    None) are consecutive too, so that each chunk writes one block of rows."""
    if out_rows is None:
        return [(begin, min(chunk, total - begin), begin) for begin in range(0, total, chunk)]
    breaks = ((out_rows[1:] - out_rows[:-1]) != 1).nonzero()[:, 0] + 1
    run_bounds = [0] + breaks.tolist() + [total]
    first_rows = out_rows[run_bounds[:-1]].tolist()
    chunks = []
    for run_begin, run_end, first_row in zip(run_bounds[:-1], run_bounds[1:], first_rows):
        for begin in range(run_begin, run_end, chunk):
            chunks.append((begin, min(chunk, run_end - begin), first_row + begin - run_begin))
    return chunks


def _plan_merge(finer: Tensor, group: int, steps: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Plan ``[N, m, m, C]`` bin maxima -> ``[N, m/group, m/group, C]``: each coarse bin is the
    max of a ``group x group`` block of fine bins. Appends ``(first, second, out)`` operands of
    ``torch.maximum`` to ``steps`` and returns the (not yet computed) coarse buffer. Reduced one
    axis at a time with elementwise maxima (a multi-axis ``amax`` over this strided view is
    several times slower)."""
    count, m, _, channels = finer.shape
    n = m // group  # group >= 2: a level is only merged from a strictly finer one
    along_x = finer.view(count, m, n, group, channels)
    merged_x = finer.new_empty((count, m, n, channels))
    steps.append((along_x[:, :, :, 0], along_x[:, :, :, 1], merged_x))
    steps.extend((merged_x, along_x[:, :, :, k], merged_x) for k in range(2, group))
    along_y = merged_x.view(count, n, group, n, channels)
    merged = finer.new_empty((count, n, n, channels))
    steps.append((along_y[:, :, 0], along_y[:, :, 1], merged))
    steps.extend((merged, along_y[:, :, k], merged) for k in range(2, group))
    return merged


# --- CPU kernel (numba) ------------------------------------------------------------------
#
# On the CPU the torch path above spends most of its time in per-chunk operator overhead and
# in the channel transpose, not in the maxima. The kernel below answers each window in one
# pass with the map channels-last, so every inner loop runs over contiguous channels, and
# writes each output row once, in its final layout and dtype.
#
# Maxima are taken on order-preserving integer keys of the float bits rather than on the
# floats: numba has no float16 arithmetic, integer max vectorises without NaN branches, and
# one key transform serves every width. For IEEE bits ``s`` read as a signed integer,
# ``s ^ ((s >> (bits - 1)) & MAX)`` orders like the floats (negatives have their magnitude
# bits flipped) and is its own inverse. NaNs are given a clear sign bit first, so every NaN
# key is above +inf's and a bin containing NaN yields NaN, as adaptive pooling does.

# float64 maps take the torch path: rare here, and each key width is one more JIT compile.
_KEY_DTYPES = {np.dtype(np.float16): np.int16, np.dtype(np.float32): np.int32}

# Set to False (tests, benchmarks) to force the torch path on the CPU too.
_USE_NUMBA = True
_numba_module = None  # sppcli.ops._spp_pool_numba once imported; False when numba is unavailable


def _cpu_kernel():
    """The numba kernels' module, imported on first use (numba's import costs ~0.5 s, and
    compiled code is cached on disk), or None when numba is not installed."""
    global _numba_module
    if _numba_module is None:
        try:
            _numba_module = importlib.import_module("sppcli.ops._spp_pool_numba")
        except ImportError:
            _numba_module = False
    return _numba_module or None


def _pool_on_cpu(kernels, fmap: Tensor, cells: Tensor, levels: Sequence[int], dedup: bool) -> Tensor:
    """:func:`spp_pool` of a CPU map through the numba kernel (inputs validated, N > 0)."""
    channels, height, width = fmap.shape
    values = fmap.contiguous().numpy()
    key_dtype = _KEY_DTYPES[values.dtype]
    keys = np.empty((height, width, channels), dtype=key_dtype)
    infinity = np.array(np.inf, dtype=values.dtype).view(key_dtype)
    keys_are_bits = kernels.map_keys(values.view(key_dtype), infinity, np.iinfo(key_dtype).max, keys)
    cells_np = np.ascontiguousarray(cells.numpy(), dtype=np.int64)
    total = cells_np.shape[0]
    # One integer per window (exact: cells lie inside the map), row-major by top-left cell:
    # computed in that order, consecutive windows read overlapping parts of the map.
    x1, y1, x2, y2 = cells_np.T
    window_ids = ((y1 * width + x1) * height + y2) * width + x2
    if dedup:
        # Each repeat copies the row of its window's first occurrence (``first`` is in the
        # order of the sorted ids).
        _, first, inverse = np.unique(window_ids, return_index=True, return_inverse=True)
        sources = first[inverse.reshape(-1)].astype(np.int64)
        order = first.astype(np.int64)
    else:
        sources = np.arange(total, dtype=np.int64)
        order = np.argsort(window_ids, kind="stable").astype(np.int64)

    plan = _plan_levels(levels)
    distinct = sorted(plan, reverse=True)  # fine to coarse: a merged level's source comes first
    sizes = np.array(distinct, dtype=np.int64)
    parents = np.array([-1 if plan[n] is None else distinct.index(plan[n]) for n in distinct], dtype=np.int64)
    level_slots = np.array([distinct.index(int(n)) for n in levels], dtype=np.int64)

    dim = pooled_dim(channels, levels)
    out = np.empty((total, dim), dtype=values.dtype)
    out_keys = out.view(keys.dtype)
    # Levels are written in 64-bit words when every level's columns start on a word: the
    # channel count a multiple of the elements a word holds.
    lanes = 8 // out.itemsize
    out_words = out.view(np.int64) if channels % lanes == 0 else np.empty((total, 0), dtype=np.int64)
    kernels.pool_windows(keys, keys_are_bits, cells_np, order, sources, sizes, parents, level_slots, out_keys,
                         out_words)
    return torch.from_numpy(out)


def spp_pool(
    fmap: Tensor,
    cells: Tensor,
    levels: Sequence[int] = DEFAULT_LEVELS,
    *,
    _dedup: bool = True,
) -> Tensor:
    """Spatial-pyramid max pooling of windows of one feature map.

    Args:
        fmap (Tensor[C, H, W]): one image's feature map (e.g. conv5), float32 or float16
            (any floating dtype), on any device.
        cells (LongTensor[N, 4]): inclusive cell windows ``(x1, y1, x2, y2)`` with
            ``0 <= x1 <= x2 < W`` and ``0 <= y1 <= y2 < H`` (see
            :func:`sppcli.ops.geometry.window_to_cells`), on ``fmap``'s device.
        levels: pyramid levels; level ``n`` pools the window into ``n x n`` adaptive bins.
        _dedup: pool windows with identical cells once (internal switch for benchmarks).

    Returns:
        Tensor[N, C * sum(n * n)], ``fmap``'s dtype and device. Row ``k`` equals
        ``torch.cat([F.adaptive_max_pool2d(fmap[:, y1:y2+1, x1:x2+1], n).flatten()
        for n in levels])`` for ``cells[k]``: per level, channel-major, then bin row, then bin
        column. ``N = 0`` gives shape ``[0, D]``.

    Raises:
        ValueError: on a malformed map, cells outside the map or non-positive levels.

    Not differentiable: the result never requires grad (SPP-net trains only the layers
    after pooling, from pooled features).
    """
    _check_inputs(fmap, cells, levels)
    channels = fmap.shape[0]
    if cells.shape[0] == 0:
        return fmap.new_empty((0, pooled_dim(channels, levels)))
    fmap = fmap.detach()
    cells = cells.to(device=fmap.device, dtype=torch.long)
    if fmap.device.type == "cpu" and fmap.dtype in (torch.float16, torch.float32) and _USE_NUMBA:
        kernels = _cpu_kernel()
        if kernels is not None:
            return _pool_on_cpu(kernels, fmap, cells, levels, _dedup)
    with torch.no_grad():
        if not _dedup:
            return _pool_windows(fmap, cells, levels)
        # One integer per window (exact: cells lie inside the map), as torch.unique over rows
        # sorts lexicographically and costs ~30x more.
        height, width = fmap.shape[1:]
        x1, y1, x2, y2 = cells.unbind(1)
        keys = ((y2 * width + x2) * height + y1) * width + x1
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        total, distinct = cells.shape[0], unique_keys.shape[0]
        if distinct == total:
            return _pool_windows(fmap, cells, levels)
        # Pool each distinct window once, straight into the row of its first occurrence (in
        # row order, for sequential writes), then copy those rows to the repeats. Reordering a
        # pooled [distinct, D] result instead would cost a second pass over the ~100 MB output.
        positions = torch.arange(total, device=cells.device)
        first = torch.full((distinct,), total, dtype=torch.long, device=cells.device)
        first.scatter_reduce_(0, inverse, positions, reduce="amin")
        pooled_rows = torch.sort(first).values
        out = _new_large(fmap, (total, pooled_dim(channels, levels)))
        _pool_windows(fmap, cells[pooled_rows], levels, out=out, out_rows=pooled_rows)
        repeats = (first[inverse] != positions).nonzero().squeeze(1)
        out.index_copy_(0, repeats, out.index_select(0, first[inverse[repeats]]))
        return out
