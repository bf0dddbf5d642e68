"""The spatial pyramid pooling layer for whole inputs (classification / pretraining).

It replaces the pool5 layer: each pyramid level max-pools the conv5 map into n x n bins, and the
levels' outputs are concatenated into one fixed-length vector whatever the map size (paper
section 2.2). Pooling *windows of a feature map* for detection is a different operator,
:mod:`sppcli.ops.spp_pool`.

Two binning rules:

``"paper"``
    The paper's single-size/multi-size training rule (section 2.3): for an a x a map and
    n x n bins, a sliding max-pool with window ``ceil(a/n)`` and stride ``floor(a/n)``, applied
    per axis (a_h and a_w separately for non-square maps). The rule does not always produce n
    windows: a=10, n=6 gives window 2, stride 1 and *nine* windows, and a < n gives stride 0.
    Wherever the rule does not give exactly n windows along an axis, that axis of that level
    uses the ``"adaptive"`` bins instead, so the output length never depends on the map size.
    Where it does give n windows it may leave the last rows/columns unpooled (a=14, n=6:
    windows start at 0, 2, ..., 10 and end at 13); that is the paper's rule, kept as is.
``"adaptive"``
    ``F.adaptive_max_pool2d``: bin i of n over a cells covers ``[floor(i*a/n), ceil((i+1)*a/n))``,
    the same rule the detection-time pooling uses (DESIGN section 4). Bins may overlap and, for
    a < n, repeat cells.

Output layout: for the levels in the order given, the ``[B, C, n, n]`` result flattened
channel-major (index ``c*n*n + row*n + col``), concatenated: ``[B, C * bins(levels)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SPP_MODES = ("paper", "adaptive")


def bins(levels: Sequence[int]) -> int:
    """Total number of bins of a pyramid: sum of n*n (``(6, 3, 2, 1)`` -> 50)."""
    return sum(int(n) * int(n) for n in levels)


def paper_window(size: int, n: int) -> tuple[int, int] | None:
    """(window, stride) = (ceil(size/n), floor(size/n)) if that tiles ``size`` cells into
    exactly ``n`` windows; ``None`` otherwise (e.g. size=10, n=6, or size < n)."""
    window, stride = math.ceil(size / n), size // n
    if stride == 0 or (size - window) // stride + 1 != n:
        return None
    return window, stride


def adaptive_intervals(size: int, n: int) -> list[tuple[int, int]]:
    """Half-open cell intervals ``[floor(i*size/n), ceil((i+1)*size/n))`` for i in 0..n-1."""
    return [((i * size) // n, -((-(i + 1) * size) // n)) for i in range(n)]


def bin_intervals(size: int, n: int, mode: str) -> list[tuple[int, int]]:
    """Half-open cell intervals ``[start, end)`` of the n bins along one axis of ``size`` cells.

    ``mode="paper"`` gives the ceil-window / floor-stride windows where they number exactly n
    (falling back to the adaptive intervals otherwise); ``"adaptive"`` the adaptive intervals.
    """
    if mode not in SPP_MODES:
        raise ValueError(f"unknown SPP mode {mode!r}; known modes: {', '.join(SPP_MODES)}")
    if size < 1 or n < 1:
        raise ValueError(f"need size >= 1 and n >= 1, got size={size}, n={n}")
    if mode == "paper":
        window_stride = paper_window(size, n)
        if window_stride is not None:
            window, stride = window_stride
            return [(i * stride, i * stride + window) for i in range(n)]
    return adaptive_intervals(size, n)


def _pool_intervals(x: torch.Tensor, rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> torch.Tensor:
    # Max over a rectangle is max over its rows then over its columns, so two 1-D passes
    # handle any (possibly overlapping) intervals.
    by_rows = torch.stack([x[:, :, start:end, :].amax(dim=2) for start, end in rows], dim=2)
    return torch.stack([by_rows[:, :, :, start:end].amax(dim=3) for start, end in cols], dim=3)


def pool_level(x: torch.Tensor, n: int, mode: str = "paper") -> torch.Tensor:
    """Max-pool ``x`` [B, C, H, W] into ``[B, C, n, n]`` bins with the given rule."""
    if mode not in SPP_MODES:
        raise ValueError(f"unknown SPP mode {mode!r}; known modes: {', '.join(SPP_MODES)}")
    height, width = x.shape[-2:]
    if mode == "adaptive":
        return F.adaptive_max_pool2d(x, n)
    rows, cols = paper_window(height, n), paper_window(width, n)
    if rows is not None and cols is not None:
        return F.max_pool2d(x, kernel_size=(rows[0], cols[0]), stride=(rows[1], cols[1]))
    return _pool_intervals(x, bin_intervals(height, n, mode), bin_intervals(width, n, mode))


class SpatialPyramidPooling(nn.Module):
    """Spatial pyramid max pooling of a whole feature map into a fixed-length vector.

    Args:
        levels: pyramid levels, n for each n x n level, in output order. The paper's
            classification nets use ``(6, 3, 2, 1)`` (50 bins) or ``(4, 3, 2, 1)`` (30 bins).
        mode: ``"paper"`` or ``"adaptive"`` binning (see module docstring).

    Shapes: ``[B, C, H, W]`` (any H, W >= 1) -> ``[B, C * bins(levels)]``, dtype of the input.
    """

    def __init__(self, levels: Sequence[int] = (6, 3, 2, 1), mode: str = "paper"):
        super().__init__()
        levels = tuple(int(n) for n in levels)
        if not levels or any(n < 1 for n in levels):
            raise ValueError(f"levels must be a non-empty list of positive ints, got {levels!r}")
        if mode not in SPP_MODES:
            raise ValueError(f"unknown SPP mode {mode!r}; known modes: {', '.join(SPP_MODES)}")
        self.levels = levels
        self.mode = mode

    @property
    def bins(self) -> int:
        return bins(self.levels)

    def output_dim(self, channels: int) -> int:
        """Length of the pooled vector for a ``channels``-channel map."""
        return channels * self.bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] feature map, got shape {tuple(x.shape)}")
        if x.shape[-2] < 1 or x.shape[-1] < 1:
            raise ValueError(f"empty feature map {tuple(x.shape)}: the input image is too small for this trunk")
        pooled = [pool_level(x, n, self.mode).flatten(1) for n in self.levels]
        return torch.cat(pooled, dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"
