"""Spatial layer specs of a conv trunk, read from its own modules.

The geometry that maps image windows onto conv5 cells (total stride, receptive-field offsets)
is a property of the trunk's kernel sizes, strides and paddings. Rather than hard-coding it for
one net, :func:`layer_specs` walks the trunk's layers and :mod:`sppcli.ops.geometry` turns
those specs into a :class:`~sppcli.ops.geometry.FieldGeometry`.

Assumption, true for every trunk in :mod:`sppcli.nets.trunks`: the trunk's modules are
registered in the order they run (a plain ``nn.Sequential`` chain, no branches).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sppcli.ops.geometry import FieldGeometry, receptive_field

# Layers that leave the spatial grid alone; anything else that is not a conv/pool is refused,
# because silently skipping an unknown layer would give a wrong geometry.
_SIZE_PRESERVING = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.LocalResponseNorm,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _square(value: int | Sequence[int], what: str, layer: nn.Module) -> int:
    if isinstance(value, int):
        return value
    first, *rest = tuple(value)
    if any(other != first for other in rest):
        raise ValueError(f"{what} {tuple(value)} of {layer!r} is not square; geometry needs equal H/W values")
    return int(first)


def _spatial_layers(module: nn.Module) -> list[nn.Module]:
    layers = []
    for child in module.modules():
        if isinstance(child, _SPATIAL):
            dilation = getattr(child, "dilation", 1)
            if _square(dilation, "dilation", child) != 1:
                raise ValueError(f"dilated layer {child!r} is not supported by the geometry walker")
            layers.append(child)
        elif isinstance(child, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Upsample)):
            raise ValueError(f"{child!r} has no fixed kernel/stride; a trunk must end before it")
        elif _is_unknown_leaf(child):
            raise ValueError(f"unknown layer {child!r} in trunk; cannot tell whether it changes the map size")
    return layers


def _is_unknown_leaf(module: nn.Module) -> bool:
    if next(module.children(), None) is not None or isinstance(module, _SIZE_PRESERVING):
        return False
    # Custom normalisation layers (e.g. the within-channel LRN of ZF-5) mark themselves.
    return not getattr(module, "preserves_spatial_size", False)


def layer_specs(module: nn.Module) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of every Conv2d / MaxPool2d / AvgPool2d in run order.

    Args:
        module: a trunk whose layers are registered in the order they run.

    Returns:
        ``[(kernel, stride, padding), ...]`` as ints, one per spatial layer, first layer first.
        ReLU, LRN, dropout and layers marked ``preserves_spatial_size`` are skipped.

    Raises:
        ValueError: on non-square kernels/strides/paddings, dilation, adaptive pooling or an
            unknown leaf layer (the geometry would otherwise be silently wrong).
    """
    specs = []
    for layer in _spatial_layers(module):
        kernel = _square(layer.kernel_size, "kernel_size", layer)
        stride = _square(layer.stride if layer.stride is not None else layer.kernel_size, "stride", layer)
        padding = layer.padding
        if isinstance(padding, str):
            raise ValueError(f"string padding {padding!r} of {layer!r} is not supported; use an int")
        specs.append((kernel, stride, _square(padding, "padding", layer)))
    return specs


def trunk_geometry(module: nn.Module) -> FieldGeometry:
    """Receptive-field geometry (total stride and offsets) of ``module``'s last layer.

    Computed by :func:`sppcli.ops.geometry.receptive_field` from :func:`layer_specs`.
    """
    return receptive_field(layer_specs(module))


def _output_length(length: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    # torch's pooling_output_shape: with ceil_mode a window may hang over the bottom/right edge
    # (kernel 3 on 2 cells still gives one output, as in Caffe) ...
    numerator = length + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    # ... but a last window that would start inside the right padding is dropped.
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1
    return max(out, 0)


def feature_map_size(module: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Output (height, width) of ``module`` for an input of ``height`` x ``width`` pixels.

    Follows PyTorch's size arithmetic for Conv2d / MaxPool2d / AvgPool2d including
    ``ceil_mode``; returns 0 for a dimension that collapses (input too small).
    """
    for layer in _spatial_layers(module):
        kernel = _square(layer.kernel_size, "kernel_size", layer)
        stride = _square(layer.stride if layer.stride is not None else layer.kernel_size, "stride", layer)
        padding = _square(layer.padding, "padding", layer)
        ceil_mode = bool(getattr(layer, "ceil_mode", False))
        height = _output_length(height, kernel, stride, padding, ceil_mode)
        width = _output_length(width, kernel, stride, padding, ceil_mode)
    return height, width
