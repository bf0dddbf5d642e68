"""sppcli.nets.heads: pooled-vector layouts, the detection head and fc features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sppcli.nets.checkpoint import build_net
from sppcli.nets.heads import FcHead, detection_head, fc_features, pooled_permutation, truncated_svd_head
from sppcli.ops.spp_pool import spp_pool
from tests.conftest import TINY_ARCH
from tests.reference import reorder_pooled


def test_reordered_detection_pooling_equals_the_classifier_spp_layer():
    torch.manual_seed(0)
    arch = {**TINY_ARCH, "spp_mode": "adaptive"}
    net = build_net(arch).eval()
    channels = net.trunk.out_channels
    fmap = torch.randn(channels, 9, 13)
    with torch.no_grad():
        classifier = net.spp(fmap[None])[0].numpy()
    full = torch.tensor([[0, 0, 12, 8]])
    detection = spp_pool(fmap, full, (1, 2, 3, 6)).numpy()
    assert not np.array_equal(detection[0], classifier)  # the layouts do differ
    assert np.array_equal(reorder_pooled(detection, (1, 2, 3, 6), net.levels, channels)[0], classifier)
    # and back
    assert np.array_equal(reorder_pooled(classifier[None], net.levels, (1, 2, 3, 6), channels), detection)

    head = detection_head(net, (1, 2, 3, 6))
    with torch.no_grad():
        want = net.head.fc7_features(torch.from_numpy(classifier)[None]).numpy()
    got = fc_features(head, detection, "fc7")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the original head is untouched
    assert not torch.equal(head.fc6.weight, net.head.fc6.weight)


def test_pooled_permutation_hand_case_and_errors():
    # channels 2, levels (1, 2): [c0 1x1, c1 1x1, c0 b0..b3, c1 b0..b3]; (2, 1) puts the 2x2 first.
    assert pooled_permutation((1, 2), (2, 1), 2).tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert pooled_permutation((1, 2), (1, 2), 2).tolist() == list(range(10))
    with pytest.raises(ValueError, match="different bins"):
        pooled_permutation((1, 2, 3, 6), (4, 3, 2, 1), 2)
    with pytest.raises(ValueError, match="columns"):
        reorder_pooled(np.zeros((1, 7)), (1, 2), (2, 1), 2)


def test_fc_features_layers_in_eval_mode():
    torch.manual_seed(1)
    net = build_net(TINY_ARCH)
    net.train()  # fc_features must not apply dropout even so
    pooled = np.random.default_rng(0).standard_normal((5, net.head.in_dim)).astype(np.float16)
    x = torch.from_numpy(pooled.astype(np.float32))
    w6, b6, w7, b7 = (p.detach() for p in (net.head.fc6.weight, net.head.fc6.bias, net.head.fc7.weight,
                                           net.head.fc7.bias))
    fc6 = torch.relu(x @ w6.T + b6)
    fc7 = torch.relu(fc6 @ w7.T + b7)
    pool5 = fc_features(net.head, pooled, "pool5")
    assert pool5.dtype == np.float32 and np.array_equal(pool5, pooled.astype(np.float32))
    np.testing.assert_allclose(fc_features(net.head, pooled, "fc6", batch=2), fc6.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fc_features(net.head, pooled, "fc7", batch=3), fc7.numpy(), rtol=1e-5, atol=1e-6)
    assert fc_features(net.head, pooled[:0], "fc7").shape == (0, net.head.hidden)
    with pytest.raises(ValueError, match="fc8"):
        fc_features(net.head, pooled, "fc8")


def test_truncated_svd_head_is_the_best_rank_r_approximation():
    torch.manual_seed(2)
    head = FcHead(40, 24, 0.5).eval()
    x = torch.randn(7, 40)
    exact = truncated_svd_head(head, 0, 0)
    assert torch.equal(exact.fc7_features(x), head.fc7_features(x))  # rank 0: nothing changes
    full = truncated_svd_head(head, 24, 24)
    assert isinstance(full.fc6, torch.nn.Linear)
    low = truncated_svd_head(head, 6, 5)
    assert low.fc6[0].out_features == 6 and low.fc7[0].out_features == 5
    # fc6 of the copy is U_r S_r V_r^T: its error is the tail singular values, the optimum (Eckart-Young)
    w = head.fc6.weight.double()
    approx = (low.fc6[1].weight.double() @ low.fc6[0].weight.double())
    s = torch.linalg.svdvals(w)
    assert torch.linalg.matrix_norm(w - approx).item() == pytest.approx(s[6:].square().sum().sqrt().item(), rel=1e-4)
    # and a higher rank approximates the exact features better
    mid = truncated_svd_head(head, 16, 16)
    err = [(h.fc7_features(x) - head.fc7_features(x)).norm().item() for h in (low, mid)]
    assert err[1] < err[0]
