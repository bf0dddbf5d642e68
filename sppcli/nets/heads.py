"""Fully-connected head on top of the SPP vector: fc6 -> ReLU -> dropout -> fc7 -> ReLU ->
dropout [-> fc8].

fc6 and fc7 are 4096-d in the paper; ``hidden`` shrinks them for the small demo nets. fc8 is
the classifier (1000-way for ImageNet pretraining, 21-way for VOC fine-tuning) and may be left
out when only fc6/fc7 features are wanted. All fc weights start as N(0, 0.01^2) with zero
bias, the release's weight filler.
"""

from __future__ import annotations

import torch
from torch import nn


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
