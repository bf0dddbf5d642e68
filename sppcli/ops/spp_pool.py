"""Spatial pyramid max pooling of many windows of one feature map.

:func:`spp_pool` returns, for each window, exactly (bit for bit) what this loop returns::

    torch.cat([F.adaptive_max_pool2d(fmap[:, y1:y2 + 1, x1:x2 + 1], n).flatten() for n in levels])

(:func:`spp_pool_reference` is that loop), but answers all windows with a few vectorised
gathers instead of ``len(levels)`` small pooling calls per window:

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
* Windows that map to the same cells are pooled once (``torch.unique`` on the cell rows).

The code is device-agnostic (CPU or CUDA tensors; any floating dtype that ``torch.maximum``
and ``index_select`` support on that device, float32 and float16 included).

Bit-identity caveat: when a bin's maximum is zero and the bin holds both ``+0.0`` and ``-0.0``,
the sign of the returned zero may differ from adaptive pooling's (the values compare equal).
NaNs propagate (a bin containing NaN yields NaN), as in adaptive pooling.
"""

from __future__ import annotations

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
# buffers stay in a core's L2 cache, large enough to amortise the ~35 tensor ops per chunk
# (1 and 2 MB measured alike on a 2-core Xeon; 4 MB was 15% slower, 0.25 MB 20% slower).
_CHUNK_BYTES = 2 * 1024 * 1024


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
class _Correction:
    """Bins that need one more corner block than the first: the corner's table rows, and
    either all bins of the level (``dense``) or only the listed ones (sorted flat bin ids with
    per-chunk slice bounds)."""

    corner_rows: Tensor  # [K] table rows: all bins if dense, else one per listed bin
    dense: bool
    chunk_bin_ids: Tensor | None = None  # listed bins, numbered within their chunk
    bounds: list[int] | None = None  # listed bins of chunk c: [bounds[c], bounds[c + 1])


@dataclass
class _Lookup:
    """Table-row indices answering every bin of one pyramid level, flat over (window, i, j)."""

    first_rows: Tensor  # [N * n * n] row of the (y_lo, x_lo) block of each bin
    corrections: list[_Correction]


# Above this fraction of bins needing a corner block, gathering that corner for every bin
# (2 passes over the level's bins) is cheaper than gathering, merging and scattering back only
# the bins that need it (about 4 passes over those bins).
_SPARSE_LIMIT = 0.5


def _plan_lookup(
    y_lo: Tensor, y_hi: Tensor, x_lo: Tensor, x_hi: Tensor,
    log2: Tensor, depth_x: int, height: int, width: int, chunk: int,
) -> _Lookup:
    """Corner rows of every bin of one level; ``y_lo`` etc. are ``[N, n]`` absolute edges,
    ``log2`` the floor-log2 table, ``depth_x`` the table's x depth, ``chunk`` windows per chunk.

    A bin ``[y_lo, y_hi) x [x_lo, x_hi)`` is the union of the blocks of size
    ``2^ky x 2^kx`` (``2^k`` the largest power of two not above the side) anchored at
    ``y_lo`` or ``y_hi - 2^ky`` and ``x_lo`` or ``x_hi - 2^kx``. When a side is itself a power
    of two both anchors coincide, so most small bins need one block, not four; the extra
    blocks are planned as corrections applied only to the bins that need them.
    """
    count, n = y_lo.shape
    ky, kx = log2[y_hi - y_lo], log2[x_hi - x_lo]
    y_other, x_other = y_hi - (1 << ky), x_hi - (1 << kx)
    plane = (ky[:, :, None] * depth_x + kx[:, None, :]) * (height * width)

    def rows_at(ys: Tensor, xs: Tensor) -> Tensor:
        return (plane + ys[:, :, None] * width + xs[:, None, :]).reshape(-1)

    y_split = (y_other != y_lo)[:, :, None].expand(count, n, n)
    x_split = (x_other != x_lo)[:, None, :].expand(count, n, n)
    bins_per_chunk = chunk * n * n
    chunk_starts = torch.arange(0, count * n * n, bins_per_chunk, device=y_lo.device)
    corrections = []
    for needs, ys, xs in ((y_split, y_other, x_lo), (x_split, y_lo, x_other), (y_split & x_split, y_other, x_other)):
        needs = needs.reshape(-1)
        corner = rows_at(ys, xs)
        needed = int(needs.sum())
        if needed == 0:
            continue
        if needed > _SPARSE_LIMIT * needs.numel():
            corrections.append(_Correction(corner_rows=corner, dense=True))
            continue
        bin_ids = needs.nonzero().squeeze(1)
        bounds = torch.searchsorted(bin_ids, chunk_starts).tolist() + [needed]
        corrections.append(_Correction(
            corner_rows=corner[bin_ids], dense=False, chunk_bin_ids=bin_ids % bins_per_chunk, bounds=bounds,
        ))
    return _Lookup(first_rows=rows_at(y_lo, x_lo), corrections=corrections)


def _pool_windows(
    fmap: Tensor, cells: Tensor, levels: Sequence[int], out: Tensor | None = None, out_rows: Tensor | None = None,
) -> Tensor:
    """Pooled features of ``cells`` (already validated, N > 0).

    Without ``out``: returns a new ``[N, D]`` tensor, row ``k`` for ``cells[k]``. With ``out``
    (``[M, D]``) and ``out_rows`` (``[N]``, distinct, increasing): writes the row of ``cells[k]``
    to ``out[out_rows[k]]`` and returns ``out``.
    """
    channels, height, width = fmap.shape
    device = fmap.device
    total = cells.shape[0]
    plan = _plan_levels(levels)
    looked_up = [n for n, source in plan.items() if source is None]
    finest = max(n * n for n in looked_up)
    chunk = min(total, max(1, _CHUNK_BYTES // (finest * channels * fmap.element_size())))

    x_start, y_start = cells[:, 0], cells[:, 1]
    x_len = cells[:, 2] - x_start + 1
    y_len = cells[:, 3] - y_start + 1
    edges = {}
    longest_y = longest_x = 1
    for n in looked_up:
        y_lo, y_hi = _bin_edges(y_start, y_len, n)
        x_lo, x_hi = _bin_edges(x_start, x_len, n)
        edges[n] = (y_lo, y_hi, x_lo, x_hi)
        longest_y = max(longest_y, int((y_hi - y_lo).max()))
        longest_x = max(longest_x, int((x_hi - x_lo).max()))
    depth_y, depth_x = longest_y.bit_length(), longest_x.bit_length()
    log2 = _floor_log2_table(max(longest_y, longest_x), device)
    lookups = {n: _plan_lookup(*edges[n], log2, depth_x, height, width, chunk) for n in looked_up}

    table = _build_table(fmap.permute(1, 2, 0).contiguous(), depth_y, depth_x)
    rows = table.view(-1, channels)

    dim = pooled_dim(channels, levels)
    if out is None:
        out = _new_large(fmap, (total, dim))
    starts = list(range(0, total, chunk))
    run_starts = starts if out_rows is None else _contiguous_runs(out_rows, starts, chunk)
    # A chunk whose rows have gaps is assembled here and then copied to its rows.
    staging = None if all(row is not None for row in run_starts) else fmap.new_empty((chunk, dim))
    offsets = [0]
    for n in levels[:-1]:
        offsets.append(offsets[-1] + channels * n * n)
    # Buffers reused across chunks: fresh multi-megabyte allocations would page-fault on every
    # chunk and cost more than the gathers themselves.
    gathered = {n: fmap.new_empty((chunk * n * n, channels)) for n in looked_up}
    extra = fmap.new_empty((chunk * finest, channels))
    current = fmap.new_empty((chunk * finest, channels))

    for chunk_index, begin in enumerate(starts):
        end = min(begin + chunk, total)
        count = end - begin
        bins: dict[int, Tensor] = {}  # level -> [count, n, n, C], channels last
        for n in sorted(plan, reverse=True):
            if plan[n] is not None:
                bins[n] = _merge_bins(bins[plan[n]], plan[n] // n)
                continue
            bin_count = count * n * n
            pooled = gathered[n][:bin_count]
            _look_up(rows, lookups[n], chunk_index, begin * n * n, pooled, extra[:bin_count], current[:bin_count])
            bins[n] = pooled.view(count, n, n, channels)
        run_start = run_starts[chunk_index]
        destination = staging[:count] if run_start is None else out[run_start:run_start + count]
        for n, offset in zip(levels, offsets):
            target = destination[:, offset:offset + channels * n * n].view(count, channels, n, n)
            _copy_transposed(target, bins[n].permute(0, 3, 1, 2))
        if run_start is None:
            out.index_copy_(0, out_rows[begin:end], destination)
    return out


def _contiguous_runs(out_rows: Tensor, starts: list[int], chunk: int) -> list[int | None]:
    """Per chunk of ``out_rows`` (increasing): its first row when the chunk's rows are one
    contiguous run, else None."""
    total = out_rows.shape[0]
    ends = [min(begin + chunk, total) for begin in starts]
    first_rows = out_rows[starts]
    counts = torch.tensor([end - begin for begin, end in zip(starts, ends)], device=out_rows.device)
    contiguous = (out_rows[[end - 1 for end in ends]] - first_rows + 1 == counts).tolist()
    return [row if run else None for row, run in zip(first_rows.tolist(), contiguous)]


def _look_up(
    rows: Tensor, lookup: _Lookup, chunk_index: int, first_bin: int, pooled: Tensor, extra: Tensor, current: Tensor,
) -> None:
    """Fill ``pooled`` (``[K, C]``) with the maxima of one chunk's ``K`` bins of one level,
    starting at flat bin ``first_bin``; ``extra`` and ``current`` are scratch of at least ``K`` rows."""
    bin_count = pooled.shape[0]
    torch.index_select(rows, 0, lookup.first_rows[first_bin:first_bin + bin_count], out=pooled)
    for fix in lookup.corrections:
        if fix.dense:
            torch.index_select(rows, 0, fix.corner_rows[first_bin:first_bin + bin_count], out=extra)
            torch.maximum(pooled, extra, out=pooled)
            continue
        lo, hi = fix.bounds[chunk_index], fix.bounds[chunk_index + 1]
        if lo == hi:
            continue
        local = fix.chunk_bin_ids[lo:hi]
        more, now = extra[:hi - lo], current[:hi - lo]
        torch.index_select(rows, 0, fix.corner_rows[lo:hi], out=more)
        torch.index_select(pooled, 0, local, out=now)
        torch.maximum(now, more, out=now)
        pooled.index_copy_(0, local, now)


def _copy_transposed(target: Tensor, source: Tensor) -> None:
    """``target.copy_(source)`` for a permuted ``source``. numpy's strided copy is about twice
    as fast as torch's for these batched channel transposes, so CPU tensors go through it."""
    if target.device.type == "cpu" and target.dtype in _NUMPY_DTYPES:
        np.copyto(target.numpy(), source.numpy())
    else:
        target.copy_(source)


def _merge_bins(finer: Tensor, group: int) -> Tensor:
    """``[N, m, m, C]`` bin maxima -> ``[N, m/group, m/group, C]``: each coarse bin is the max of
    a ``group x group`` block of fine bins. Reduced one axis at a time with elementwise maxima
    (a multi-axis ``amax`` over this strided view is several times slower)."""
    count, m, _, channels = finer.shape
    n = m // group  # group >= 2: a level is only merged from a strictly finer one
    along_x = finer.reshape(count, m, n, group, channels)
    merged_x = torch.maximum(along_x[:, :, :, 0], along_x[:, :, :, 1])
    for k in range(2, group):
        torch.maximum(merged_x, along_x[:, :, :, k], out=merged_x)
    along_y = merged_x.reshape(count, n, group, n, channels)
    merged = torch.maximum(along_y[:, :, 0], along_y[:, :, 1])
    for k in range(2, group):
        torch.maximum(merged, along_y[:, :, k], out=merged)
    return merged


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
    with torch.no_grad():
        if not _dedup:
            return _pool_windows(fmap, cells, levels)
        unique_cells, inverse = torch.unique(cells, dim=0, return_inverse=True)
        total, distinct = cells.shape[0], unique_cells.shape[0]
        if distinct == total:
            return _pool_windows(fmap, cells, levels)
        # Pool each distinct window once, straight into the row of its first occurrence (in
        # row order, for sequential writes), then copy those rows to the repeats. Reordering a
        # pooled [distinct, D] result instead would cost a second pass over the ~100 MB output.
        positions = torch.arange(total, device=cells.device)
        first = torch.full((distinct,), total, dtype=torch.long, device=cells.device)
        first.scatter_reduce_(0, inverse, positions, reduce="amin")
        by_row = torch.argsort(first)
        out = _new_large(fmap, (total, pooled_dim(channels, levels)))
        _pool_windows(fmap, unique_cells[by_row], levels, out=out, out_rows=first[by_row])
        repeats = (first[inverse] != positions).nonzero().squeeze(1)
        out.index_copy_(0, repeats, out.index_select(0, first[inverse[repeats]]))
        return out
