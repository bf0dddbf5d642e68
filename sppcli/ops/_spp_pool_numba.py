"""The numba kernel behind :func:`sppcli.ops.spp_pool.spp_pool` on the CPU.

Kept in its own module so that importing :mod:`sppcli.ops.spp_pool` does not import numba;
see that module for the key transform and the adaptive-bin rules this kernel follows.
"""

from __future__ import annotations

import numba
import numpy as np

# Every kernel is compiled once per key width and cached on disk (cache=True), and uses numpy's
# error model: no zero-division checks in the bin-edge arithmetic (levels are validated >= 1).


@numba.njit(cache=True, nogil=True, error_model="numpy")
def map_keys(bits, infinity, magnitude, keys):
    """``keys[y, x, c]``: the order-preserving key of float bits ``bits[c, y, x]`` (signed
    integers of the float's width; ``infinity`` is +inf's bits, ``magnitude`` all bits but the
    sign). NaNs lose their sign first, so that every NaN key lies above +inf's.

    Returns whether every key equals its bits (no negative value and no NaN, as in a map
    after ReLU): then pooled keys need no conversion back."""
    channels, height, width = bits.shape
    unchanged = True
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                value = bits[c, y, x]
                if value & magnitude > infinity:
                    value &= magnitude
                key = value ^ ((value >> (bits.itemsize * 8 - 1)) & magnitude)
                unchanged &= key == bits[c, y, x]
                keys[y, x, c] = key
    return unchanged


@numba.njit(cache=True, nogil=True, error_model="numpy")
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _write_channel_major(bins, row):
    """``row[c * B + b] = bins[b, c]`` for the ``[B, C]`` bins of one level."""
    count, channels = bins.shape
    for c in range(channels):
        for b in range(count):
            row[c * count + b] = bins[b, c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _write_channel_major_words(bins, words, row_words):
    """:func:`_write_channel_major` for a bin count divisible by ``lanes = 64 / bits`` (4 for
    16-bit keys, 2 for 32-bit), moving 64-bit words: bins ``lanes * q .. lanes * q + lanes - 1``
    of a channel are adjacent in the row, so they are packed into one word (vectorised over
    channels) and the strided transpose, which costs per element, moves a ``lanes``-th as many.
    ``row_words`` is the row viewed as int64; ``words`` scratch of at least ``[B / lanes, C]``."""
    count, channels = bins.shape
    bits = bins.itemsize * 8
    lanes = 64 // bits
    mask = (np.int64(1) << bits) - 1
    per_channel = count // lanes
    for q in range(per_channel):
        packed = words[q]
        b0, b1 = bins[lanes * q], bins[lanes * q + 1]
        # the lanes spelt out in one pass: a pass per lane over the same row measured slower
        if lanes == 4:
            b2, b3 = bins[lanes * q + 2], bins[lanes * q + 3]
            for c in range(channels):
                packed[c] = ((np.int64(b0[c]) & mask) | ((np.int64(b1[c]) & mask) << 16)
                             | ((np.int64(b2[c]) & mask) << 32) | (np.int64(b3[c]) << 48))
        else:
            for c in range(channels):
                packed[c] = (np.int64(b0[c]) & mask) | (np.int64(b1[c]) << 32)
    for c in range(channels):
        for q in range(per_channel):
            row_words[c * per_channel + q] = words[q, c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _merge_bins(bins, target, first, group, row_length):
    """``bins[target]`` = max of the ``group x group`` block of bins from ``bins[first]``, in a
    grid of ``row_length`` bins a row."""
    acc = bins[target]
    start = bins[first]
    for c in range(acc.shape[0]):
        acc[c] = start[c]
    for a in range(group):
        for b in range(group):
            row = bins[first + a * row_length + b]
            for c in range(acc.shape[0]):
                acc[c] = max(acc[c], row[c])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pool_windows(keys, keys_are_bits, cells, order, sources, sizes, parents, level_slots, out, out_words):
    """Pooled keys of every window, written to ``out`` in its final layout.

    Args:
        keys: ``[H, W, C]`` order-preserving integer keys of the map (channels last).
        keys_are_bits: whether every key equals its float's bits (see :func:`map_keys`).
        cells: ``[N, 4]`` inclusive windows ``(x1, y1, x2, y2)``, validated.
        order: the rows to compute, in the order to compute them (windows sorted by
            position, so that consecutive windows read overlapping parts of the map).
        sources: ``[N]``; row ``k`` not in ``order`` is copied from row ``sources[k]``, which is.
        sizes: the distinct levels, fine to coarse.
        parents: per distinct level, the index of the finer level it is merged from, or -1
            when it is scanned from the map.
        level_slots: per output level (in output order), its index in ``sizes``.
        out: ``[N, D]`` integer view of the float output; receives the float bits.
        out_words: ``out`` viewed as int64 (``[N, D * bits / 64]``), or ``[N, 0]`` when the
            channel count is not a multiple of ``64 / bits`` (then every level is written one
            element at a time).
    """
    channels = keys.shape[2]
    bits = out.itemsize * 8
    magnitude = (1 << (bits - 1)) - 1
    count = sizes.shape[0]
    starts = np.zeros(count + 1, dtype=np.int64)
    for t in range(count):
        starts[t + 1] = starts[t] + sizes[t] * sizes[t]
    bins = np.empty((starts[count], channels), dtype=keys.dtype)
    lanes = 64 // bits
    by_words = out_words.shape[1] > 0
    words = np.empty(((starts[count] + lanes - 1) // lanes, channels), dtype=np.int64)
    flat = bins.reshape(-1)
    for step in range(order.shape[0]):
        k = order[step]
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
                        _merge_bins(bins, base + i * n + j, parent_base + i * group * m + j * group, group, m)
        # Keys back to float bits, in place (contiguous, vectorised), then the channel-major
        # copy of each level into the row.
        for e in range(0 if keys_are_bits else flat.shape[0]):
            v = flat[e]
            flat[e] = v ^ ((v >> (bits - 1)) & magnitude)
        column = 0
        row_out = out[k]
        for s in range(level_slots.shape[0]):
            t = level_slots[s]
            n2 = sizes[t] * sizes[t]
            base = starts[t]
            level_bins = bins[base:base + n2]
            if by_words and n2 % lanes == 0:
                _write_channel_major_words(level_bins, words, out_words[k, column // lanes:(column + channels * n2) // lanes])
            else:
                _write_channel_major(level_bins, row_out[column:column + channels * n2])
            column += channels * n2
    for k in range(sources.shape[0]):
        source = sources[k]
        if source != k:
            row_out, row_in = out[k], out[source]
            for e in range(row_out.shape[0]):
                row_out[e] = row_in[e]
