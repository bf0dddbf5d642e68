"""sppcli.nets.net_source: which weights a features artifact uses, and loading them."""
from __future__ import annotations

import torch

from sppcli.nets.net_source import load_net


def test_load_net_is_deterministic_for_fresh_layers(tiny_weights):
    net_a, arch = load_net(tiny_weights)
    torch.manual_seed(123)
    net_b, _ = load_net(tiny_weights, {**arch, "num_classes": 3})  # fc8 fresh, seeded
    net_c, _ = load_net(tiny_weights, {**arch, "num_classes": 3})
    assert torch.equal(net_b.head.fc8.weight, net_c.head.fc8.weight)
    assert torch.equal(net_a.head.fc7.weight, net_b.head.fc7.weight)
