"""Image <-> feature-map geometry: receptive fields, window -> cell mapping, scale choice.

Implemented with torch (boxes in, LongTensor out, on the boxes' device); the window arithmetic
runs in float64 so that edges landing exactly on a cell boundary are decided exactly.

Coordinate conventions
----------------------
* Image boxes are the project's internal ``(x1, y1, x2, y2)`` in 0-based *continuous
  pixel-edge* coordinates: pixel ``i`` covers ``[i, i + 1)`` and its centre is ``i + 0.5``.
* Feature-map cells are 0-based integer indices; windows on the map are inclusive
  ``(x1, y1, x2, y2)`` cell indices.
* :class:`FieldGeometry` offsets are continuous coordinates of the (scaled) input image.

The authors' release (``spm_pool_caffe_mex.cpp`` / ``spm_response_boxes.m`` in SPP_net) works
on 1-based inclusive pixel indices ``(l, t, r, b)`` and maps a window to conv5 cells with::

    left  = floor((l - offset0 + offset) / S + 0.5) + 1      (1-based cells)
    right = ceil ((r - offset0 - offset) / S - 0.5) + 1

then collapses ``left > right`` to their midpoint and clamps to the map. Reading the rule:
``floor(v + 0.5)`` rounds to the nearest cell, so ``left`` is the cell whose receptive-field
centre is nearest to the point ``offset`` pixels *inside* the window's first pixel (and
``right`` likewise from the last pixel). ``offset0`` is therefore the coordinate of the
receptive-field centre of the first cell (the release's ZF-5 value 21 is exactly that centre
in its 1-based pixel indices; see :func:`receptive_field`), and ``offset`` is an inward margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FieldGeometry",
    "best_scale_index",
    "receptive_field",
    "scaled_size",
    "window_to_cells",
]


@dataclass(frozen=True)
class FieldGeometry:
    """How cells of a conv feature map sit on the input image.

    Attributes:
        stride: total stride ``S`` (product of all layer strides): neighbouring cells'
            receptive fields are ``S`` input pixels apart.
        offset0: continuous input coordinate of the centre of cell 0's receptive field
            (cell ``j`` is centred at ``offset0 + S * j``; the same number for x and y).
        offset: the inward margin of the window -> cell rule (see :func:`window_to_cells`),
            in input pixels. :func:`receptive_field` sets it to ``S / 2``.
    """

    stride: int
    offset0: float
    offset: float


def receptive_field(layers: Sequence[tuple[int, int, int]]) -> FieldGeometry:
    """Geometry of the last layer of a chain of conv/pool layers.

    Args:
        layers: ``(kernel, stride, padding)`` of each conv/pool layer, in the order they run
            (square kernels; layers that keep the grid, e.g. ReLU or LRN, are left out).

    Returns:
        FieldGeometry with

        * ``stride = prod(stride_l)``.
        * ``offset0``: a layer maps output cell ``j`` onto input cells centred at
          ``stride_l * j + (kernel_l - 1) / 2 - padding_l`` (in input-cell indices).
          Chaining through the layers, the centre of cell ``j`` sits at pixel index
          ``S * j + a`` with ``a = sum_l S_{<l} * ((kernel_l - 1) / 2 - padding_l)``, where
          ``S_{<l}`` is the product of the strides before layer ``l``. Pixel index ``a`` has
          continuous centre ``a + 0.5``, which is ``offset0``. For the release's ZF-5
          (conv2 padding 0) ``a = 20``: 21 in the release's 1-based indices, its ``offset0``.
          For the ZF-5 of DESIGN (conv2 padding 2) ``a = 12`` and ``offset0 = 12.5``.
        * ``offset = S / 2``: with this margin the rule of :func:`window_to_cells` keeps
          exactly the cells whose receptive-field centres lie strictly inside the window
          (between the centres of its first and last pixels), which is the paper's rule
          ``floor(x/S) + 1`` / ``ceil(x/S) - 1`` (it is that rule when ``offset0 = 0``).
          The release hand-set ``offset = 6.5`` for ZF-5 (``S = 16``), which also admits
          cells centred up to 1.5 pixels outside; no layer quantity yields that number, so
          it is not derived here. ``dataclasses.replace(geometry, offset=6.5)`` reproduces it.

    Raises:
        ValueError: on an empty chain or a non-positive kernel/stride or negative padding.
    """
    if len(layers) == 0:
        raise ValueError("receptive_field needs at least one (kernel, stride, padding) layer")
    stride = 1
    centre_index = 0.0
    for kernel, layer_stride, padding in layers:
        if kernel < 1 or layer_stride < 1 or padding < 0:
            raise ValueError(f"invalid layer (kernel={kernel}, stride={layer_stride}, padding={padding})")
        centre_index += stride * ((kernel - 1) / 2 - padding)
        stride *= layer_stride
    return FieldGeometry(stride=stride, offset0=centre_index + 0.5, offset=stride / 2)


def window_to_cells(boxes: Tensor, geometry: FieldGeometry, fmap_height: int | Tensor,
                    fmap_width: int | Tensor) -> Tensor:
    """Map image windows onto inclusive feature-map cell ranges (the release's rule).

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` continuous pixel-edge coordinates in the
            *scaled* image the feature map was computed from.
        geometry: the trunk's :class:`FieldGeometry`.
        fmap_height, fmap_width: size of the feature map in cells (>= 1): one size for all
            windows, or integer tensors ``[N]`` when the windows lie on maps of different sizes.

    Returns:
        LongTensor[N, 4]: inclusive cell indices ``(x1, y1, x2, y2)`` with
        ``0 <= x1 <= x2 < fmap_width`` and ``0 <= y1 <= y2 < fmap_height``, on the boxes' device.

    Rule (0-based; ``S``, ``o0``, ``o`` = stride, offset0, offset)::

        left  = floor((u - o0 + o) / S + 0.5)    u = x1 + 0.5, the centre of the first pixel
        right = ceil ((v - o0 - o) / S - 0.5)    v = x2 - 0.5, the centre of the last pixel
        if left > right: left = right = floor((left + right) / 2)
        clamp both to [0, fmap_width - 1]        (same for y)

    The left edge ``x1`` is the first pixel, and ``x2`` is exclusive so the last pixel is
    ``x2 - 1``; the rule is applied to those pixels' centres, which is the release's rule on
    its 1-based inclusive pixel indices shifted by a constant (both sides and ``offset0`` move
    together). The midpoint collapse and the clamping order match the release, so a window
    smaller than a cell, or lying outside the map, still gets a valid cell.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    heights = torch.as_tensor(fmap_height, dtype=torch.float64, device=boxes.device)
    widths = torch.as_tensor(fmap_width, dtype=torch.float64, device=boxes.device)
    if bool((heights < 1).any()) or bool((widths < 1).any()):
        raise ValueError(f"feature map must be at least 1 x 1, got {fmap_height} x {fmap_width}")
    coords = boxes.to(torch.float64)
    stride, origin, margin = float(geometry.stride), float(geometry.offset0), float(geometry.offset)
    first_centres = coords[:, :2] + 0.5
    last_centres = coords[:, 2:] - 0.5
    start = torch.floor((first_centres - origin + margin) / stride + 0.5)
    end = torch.ceil((last_centres - origin - margin) / stride - 0.5)
    crossed = start > end
    midpoint = torch.floor((start + end) / 2)
    start = torch.where(crossed, midpoint, start)
    end = torch.where(crossed, midpoint, end)
    upper = torch.stack(torch.broadcast_tensors(widths - 1, heights - 1), dim=-1)
    zero = torch.zeros((), dtype=torch.float64, device=boxes.device)
    start = torch.minimum(torch.maximum(start, zero), upper)
    end = torch.minimum(torch.maximum(end, zero), upper)
    return torch.cat([start, end], dim=1).to(torch.long)


def best_scale_index(
    boxes: Tensor, scale_factors: Sequence[float], target_area: float = 224 * 224
) -> Tensor:
    """Per window, the scale at which its scaled area is closest to ``target_area``.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` continuous pixel-edge coordinates of the
            *original* image.
        scale_factors: resize factor of the image at each scale (e.g. ``688 / min(W, H)``,
            or the capped factor returned by :func:`scaled_size`).
        target_area: the area to approach, in scaled pixels (224 x 224 in the paper).

    Returns:
        LongTensor[N]: index into ``scale_factors`` per box; ties go to the earlier scale.

    The release (``spm_expected_scale.m``) computes an expected scale
    ``E = sqrt(target_area) * min(W, H) / sqrt(area)`` (its ``area`` uses "+1" widths, which is
    ``w * h`` here) and picks the scale whose target short side ``s_i`` minimises ``|s_i - E|``
    linearly. Dividing both by ``min(W, H)`` gives the same choice in the factor domain used
    here: ``argmin_i |f_i - sqrt(target_area / area)|``. Two differences: the release rounds
    ``E`` to an integer (which only moves near-exact ties) and compares against nominal short
    sides, whereas these are the factors actually applied (they differ only where a
    ``max_side`` cap shrank a scale). Windows under one pixel of area count as one pixel.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if len(scale_factors) == 0:
        raise ValueError("scale_factors is empty")
    coords = boxes.to(torch.float64)
    areas = ((coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])).clamp(min=1.0)
    expected = torch.sqrt(target_area / areas)
    factors = torch.as_tensor(list(scale_factors), dtype=torch.float64, device=boxes.device)
    # argmin returns the first minimum, so equal distances choose the earlier scale.
    return torch.argmin((factors[None, :] - expected[:, None]).abs(), dim=1)


def scaled_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int, float]:
    """Size of an image resized so that its short side is ``min_side``, long side capped.

    Args:
        width, height: original image size in pixels (positive).
        min_side: target length of the shorter side.
        max_side: upper bound on the longer side after resizing; when ``min_side`` would make
            the longer side (rounded) exceed it, the factor becomes ``max_side / max(w, h)``.

    Returns:
        ``(new_width, new_height, factor)``: sizes are ``factor * size`` rounded to the
        nearest integer (halves up), at least 1. Scale boxes by ``factor`` (continuous
        coordinates), which is exact up to this rounding of the image size.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if min_side < 1 or max_side < 1:
        raise ValueError(f"min_side and max_side must be positive, got {min_side}, {max_side}")
    factor = min_side / min(width, height)
    if _round_half_up(max(width, height) * factor) > max_side:
        factor = max_side / max(width, height)
    return max(1, _round_half_up(width * factor)), max(1, _round_half_up(height * factor)), factor


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even; image sizes conventionally round halves up.
    return int(math.floor(value + 0.5))
