"""Fully-connected head on top of the SPP vector: fc6 -> ReLU -> dropout -> fc7 -> ReLU ->
dropout [-> fc8].

fc6 and fc7 are 4096-d in the paper; ``hidden`` shrinks them for the small demo nets. fc8 is
the classifier (1000-way for ImageNet pretraining, 21-way for VOC fine-tuning) and may be left
out when only fc6/fc7 features are wanted. All fc weights start as N(0, 0.01^2) with zero
bias, the release's weight filler.

Pooled-vector layouts. Both the classifier's SPP layer (:mod:`sppcli.nets.spp_layer`) and the
detection pooling (:mod:`sppcli.ops.spp_pool`) lay a vector out level by level in the order the
levels are listed, each level channel-major (``c * n * n + row * n + col``). The classifier
uses ``(6, 3, 2, 1)``, detection ``(1, 2, 3, 6)``: same bins, different positions. fc6 was trained
on the classifier's layout, so :func:`detection_head` permutes fc6's input columns once so that
detection-pooled vectors meet the weights each bin was trained with.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

#: Layers whose features the detector can use: the pooled vector itself, fc6 or fc7 after ReLU.
FC_LAYERS = ("pool5", "fc6", "fc7")


class FcHead(nn.Module):
    """fc6/fc7 (+ optional fc8) head.

    Args:
        in_dim: length of the pooled input vector (C * bins).
        hidden: width of fc6 and fc7.
        dropout: drop probability after fc6 and after fc7 (active in ``train()`` mode only).
        num_outputs: size of fc8; ``None`` builds no fc8.

    Shapes: ``[B, in_dim] -> [B, num_outputs]`` (or ``[B, hidden]`` fc7 features if there is no
    fc8), float.
    """

    def __init__(self, in_dim: int, hidden: int = 4096, dropout: float = 0.5, num_outputs: int | None = None):
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim and hidden must be >= 1, got in_dim={in_dim}, hidden={hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.hidden = hidden
        self.fc6 = nn.Linear(in_dim, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc8: nn.Linear | None = None
        for layer in (self.fc6, self.fc7):
            _init_linear(layer, std=0.01)
        if num_outputs is not None:
            self.new_fc8(num_outputs)

    @property
    def num_outputs(self) -> int | None:
        return None if self.fc8 is None else self.fc8.out_features

    def new_fc8(self, num_outputs: int, std: float = 0.01) -> nn.Linear:
        """Replace fc8 by a fresh ``hidden -> num_outputs`` layer, weights N(0, std^2), bias 0
        (the paper's fine-tuning initialisation), on the device/dtype of fc7."""
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        fc8 = nn.Linear(self.hidden, num_outputs).to(device=self.fc7.weight.device, dtype=self.fc7.weight.dtype)
        _init_linear(fc8, std=std)
        self.fc8 = fc8
        return fc8

    def fc6_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, in_dim] -> fc6 after ReLU, before dropout: [B, hidden]."""
        return self.relu(self.fc6(pooled))

    def fc7_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, in_dim] -> fc7 after ReLU, before dropout: [B, hidden].

        In ``train()`` mode the dropout after fc6 is applied on the way; call ``eval()`` for
        deterministic features.
        """
        return self.relu(self.fc7(self.dropout(self.fc6_features(pooled))))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        fc7 = self.fc7_features(pooled)
        if self.fc8 is None:
            return fc7
        return self.fc8(self.dropout(fc7))


def _init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    nn.init.zeros_(layer.bias)


def _level_offsets(levels: Sequence[int], channels: int) -> dict[int, int]:
    offsets, position = {}, 0
    for n in levels:
        offsets[int(n)] = position
        position += channels * int(n) * int(n)
    return offsets


def pooled_permutation(from_levels: Sequence[int], to_levels: Sequence[int], channels: int) -> np.ndarray:
    """Column indices ``perm`` with ``pooled_to = pooled_from[:, perm]``.

    Args:
        from_levels, to_levels: the same set of pyramid levels in two orders, e.g.
            ``(1, 2, 3, 6)`` and ``(6, 3, 2, 1)``.
        channels: C of the pooled conv map.

    Returns:
        int64 ``[C * sum(n * n)]``.

    Raises:
        ValueError: the two lists do not hold the same levels (the vectors then hold different
            bins, and no permutation relates them).
    """
    from_levels = [int(n) for n in from_levels]
    to_levels = [int(n) for n in to_levels]
    if sorted(from_levels) != sorted(to_levels) or len(set(from_levels)) != len(from_levels):
        raise ValueError(f"pyramid levels {tuple(from_levels)} and {tuple(to_levels)} hold different bins; "
                         "set pool.levels to the net's levels in any order")
    source = _level_offsets(from_levels, channels)
    return np.concatenate([source[n] + np.arange(channels * n * n, dtype=np.int64) for n in to_levels])


def detection_head(net, pool_levels: Sequence[int]) -> FcHead:
    """A copy of ``net.head`` (an :class:`~sppcli.nets.sppnet.SppNet`'s) whose fc6 takes
    vectors pooled with ``pool_levels`` ordering.

    ``detection_head(net, (1, 2, 3, 6))(x)`` equals ``net.head(x[:, pooled_permutation((1, 2, 3, 6),
    net.levels, C)])``: fc6's weight columns are permuted once instead of every vector.
    """
    # det = cls[:, perm], so W_det @ det = W_cls @ cls exactly when W_det = W_cls[:, perm].
    perm = torch.from_numpy(pooled_permutation(net.levels, pool_levels, net.trunk.out_channels))
    head = copy.deepcopy(net.head)
    with torch.no_grad():
        head.fc6.weight.copy_(net.head.fc6.weight[:, perm.to(net.head.fc6.weight.device)])
    return head


@torch.no_grad()
def fc_features(head: FcHead, pooled: np.ndarray, layer: str, device: str | torch.device = "cpu",
                batch: int = 4096, precision: torch.dtype | None = None) -> np.ndarray:
    """Features of pooled windows at ``layer``, in eval mode (no dropout).

    Args:
        head: an fc head whose fc6 takes ``pooled``'s layout (see :func:`detection_head`).
        pooled: ``[N, D]`` pooled conv5 vectors (any float dtype, e.g. a pool item's
            ``features``).
        layer: ``"pool5"`` (the pooled vector itself), ``"fc6"`` or ``"fc7"`` (after ReLU).
        device: where to run the head; it is moved there and left in eval mode.
        batch: rows per forward pass.
        precision: None (the head's float32) or a dtype to autocast the matrix products to
            (``torch.bfloat16``: ~4x faster on CPUs with AVX512-BF16 and on GPUs).

    Returns:
        float32 ``[N, D]`` for pool5, ``[N, hidden]`` for fc6 / fc7.
    """
    if layer not in FC_LAYERS:
        raise ValueError(f"unknown feature layer {layer!r}; known layers: {', '.join(FC_LAYERS)}")
    pooled = np.asarray(pooled)
    if pooled.ndim != 2:
        raise ValueError(f"pooled must be [N, D], got shape {pooled.shape}")
    if layer == "pool5":
        return pooled.astype(np.float32, copy=False)
    if pooled.shape[1] != head.in_dim:
        raise ValueError(f"pooled vectors have {pooled.shape[1]} columns, the head takes {head.in_dim}")
    head = head.to(device).eval()
    out = np.empty((pooled.shape[0], head.hidden), dtype=np.float32)
    forward = head.fc6_features if layer == "fc6" else head.fc7_features
    autocast = torch.autocast(torch.device(device).type, dtype=precision, enabled=precision is not None)
    for start in range(0, pooled.shape[0], max(1, int(batch))):
        chunk = torch.from_numpy(np.ascontiguousarray(pooled[start:start + batch], dtype=np.float32)).to(device)
        with autocast:
            out[start:start + chunk.shape[0]] = forward(chunk).float().cpu().numpy()
    return out


def truncated_svd_head(head: FcHead, rank6: int, rank7: int) -> FcHead:
    """A copy of ``head`` with fc6 and fc7 replaced by their rank-``r`` truncated SVDs.

    Fast R-CNN's test-time trick (Girshick 2015, section 3.1): ``W ~ U_r S_r V_r^T`` becomes two
    layers, ``S_r V_r^T`` (no bias) then ``U_r`` with the original bias, so an ``out x in`` layer
    costs ``r (in + out)`` multiply-adds instead of ``in x out``. A rank of 0 (or one at least the
    layer's full rank) keeps that layer as it is. The copy is in eval mode.
    """
    new = copy.deepcopy(head)
    with torch.no_grad():
        for name, rank in (("fc6", int(rank6)), ("fc7", int(rank7))):
            layer = getattr(head, name)
            full = min(layer.in_features, layer.out_features)
            if rank <= 0 or rank >= full:
                continue
            u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
            first = nn.Linear(layer.in_features, rank, bias=False)
            second = nn.Linear(rank, layer.out_features)
            first.weight.copy_((s[:rank, None] * vh[:rank]).to(layer.weight.dtype))
            second.weight.copy_(u[:, :rank].to(layer.weight.dtype))
            second.bias.copy_(layer.bias)
            setattr(new, name, nn.Sequential(first, second).to(layer.weight.device))
    return new.eval()
