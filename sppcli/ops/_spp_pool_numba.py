"""The numba kernel behind :func:`sppcli.ops.spp_pool.spp_pool` on the CPU.

Kept in its own module so that importing :mod:`sppcli.ops.spp_pool` does not import numba;
see that module for the key transform and the adaptive-bin rules this kernel follows.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _scan_bin(keys, y_lo, y_hi, x_lo, x_hi, acc):
    """``acc[c]`` = max key over cells ``[y_lo, y_hi) x [x_lo, x_hi)`` for every channel."""
    channels = acc.shape[0]
    first = keys[y_lo, x_lo]
    for c in range(channels):  # explicit loops: numba's slice assignment costs ~0.5 us a call
        acc[c] = first[c]
    for y in range(y_lo, y_hi):
        for x in range(x_lo, x_hi):
            row = keys[y, x]
            for c in range(channels):
                acc[c] = max(acc[c], row[c])  # unconditional store: vectorises


@numba.njit(cache=True, nogil=True)
def _write_channel_major(bins, row):
    """``row[c * B + b] = bins[b, c]`` for the ``[B, C]`` bins of one level."""
    count, channels = bins.shape
    for c in range(channels):
        for b in range(count):
            row[c * count + b] = bins[b, c]


@numba.njit(cache=True, nogil=True)
def pool_windows(keys, cells, sources, sizes, parents, level_slots, out):
    """Pooled keys of every window, written to ``out`` in its final layout.

    Args:
        keys: ``[H, W, C]`` order-preserving integer keys of the map (channels last).
        cells: ``[N, 4]`` inclusive windows ``(x1, y1, x2, y2)``, validated.
        sources: ``[N]``; row ``k`` is computed when ``sources[k] == k``, else copied from
            row ``sources[k] < k``.
        sizes: the distinct levels, fine to coarse.
        parents: per distinct level, the index of the finer level it is merged from, or -1
            when it is scanned from the map.
        level_slots: per output level (in output order), its index in ``sizes``.
        out: ``[N, D]`` integer view of the float output; receives the float bits.
    """
    channels = keys.shape[2]
    bits = out.itemsize * 8
    magnitude = (1 << (bits - 1)) - 1
    count = sizes.shape[0]
    starts = np.zeros(count + 1, dtype=np.int64)
    for t in range(count):
        starts[t + 1] = starts[t] + sizes[t] * sizes[t]
    bins = np.empty((starts[count], channels), dtype=keys.dtype)
    flat = bins.reshape(-1)
    for k in range(cells.shape[0]):
        source = sources[k]
        if source != k:
            row_out, row_in = out[k], out[source]
            for e in range(row_out.shape[0]):
                row_out[e] = row_in[e]
            continue
        x1, y1 = cells[k, 0], cells[k, 1]
        width, height = cells[k, 2] - x1 + 1, cells[k, 3] - y1 + 1
        for t in range(count):
            n = sizes[t]
            base = starts[t]
            parent = parents[t]
            if parent < 0:
                for i in range(n):
                    y_lo = y1 + (i * height) // n
                    y_hi = y1 + ((i + 1) * height + n - 1) // n
                    for j in range(n):
                        x_lo = x1 + (j * width) // n
                        x_hi = x1 + ((j + 1) * width + n - 1) // n
                        _scan_bin(keys, y_lo, y_hi, x_lo, x_hi, bins[base + i * n + j])
            else:
                # Bin (i, j) of n is the union of a group x group block of the parent's bins.
                m = sizes[parent]
                group = m // n
                parent_base = starts[parent]
                for i in range(n):
                    for j in range(n):
                        acc = bins[base + i * n + j]
                        first = bins[parent_base + i * group * m + j * group]
                        for c in range(channels):
                            acc[c] = first[c]
                        for a in range(group):
                            for b in range(group):
                                row = bins[parent_base + (i * group + a) * m + j * group + b]
                                for c in range(channels):
                                    acc[c] = max(acc[c], row[c])
        # Keys back to float bits, in place (contiguous, vectorised), then the channel-major
        # copy of each level into the row.
        for e in range(flat.shape[0]):
            v = flat[e]
            flat[e] = v ^ ((v >> (bits - 1)) & magnitude)
        column = 0
        row_out = out[k]
        for s in range(level_slots.shape[0]):
            t = level_slots[s]
            n2 = sizes[t] * sizes[t]
            base = starts[t]
            _write_channel_major(bins[base:base + n2], row_out[column:column + channels * n2])
            column += channels * n2
