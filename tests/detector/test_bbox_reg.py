"""Bounding-box regression: the release's ridge problem, recovery, IoU gains, NPZ round trip."""
import numpy as np
import pytest
import torch

from sppcli.detector.bbox_reg import fit_ridge_regressors, load_regressor, save_regressor
from sppcli.ops.boxes import paired_iou
from sppcli.ops.boxes import apply_deltas, bbox_deltas


def _boxes(rng, n):
    xy = rng.uniform(0, 200, size=(n, 2))
    wh = rng.uniform(30, 120, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _move(boxes, deltas):
    return apply_deltas(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()


def _targets(src, dst):
    return bbox_deltas(torch.from_numpy(src), torch.from_numpy(dst)).numpy()


@pytest.mark.parametrize("max_design_bytes", [2 << 30, 0])  # whole matrix; normal equations in chunks
def test_matches_the_release_closed_form_with_penalised_bias(max_design_bytes, monkeypatch):
    # Reference: spp_train_bbox_regressor.m's ridge_reg_chol on [X*scale, 1] and centred targets,
    # beta = (A'A + lambda I)^-1 A'(Y - mu), solved here with numpy in float64.
    import sppcli.detector.bbox_reg as module

    real_chunked = module._ridge_chunked
    monkeypatch.setattr(module, "_ridge_chunked", lambda *a: real_chunked(*a, chunk=17))  # several chunks
    rng = np.random.default_rng(0)
    n, dim, scale, lam = 120, 7, 2.5, 40.0
    gt = _boxes(rng, n)
    proposals = _move(gt, 0.08 * rng.standard_normal((n, 4)))
    features = rng.standard_normal((n, dim)).astype(np.float32)
    labels = np.zeros(n, dtype=np.int64)
    regressor = fit_ridge_regressors(features, proposals, gt, labels, n_classes=1, lam=lam, feature_scale=scale,
                                     max_design_bytes=max_design_bytes)

    used = paired_iou(proposals, gt) > 0.5
    design = np.c_[features[used].astype(np.float64) * scale, np.ones(used.sum())]
    targets = _targets(proposals[used], gt[used])
    mu = targets.mean(axis=0)
    beta = np.linalg.solve(design.T @ design + lam * np.eye(dim + 1), design.T @ (targets - mu))
    np.testing.assert_allclose(regressor.coef[0], beta[:dim].T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(regressor.intercept[0], beta[dim] + mu, rtol=1e-9, atol=1e-12)
    assert regressor.n_samples[0] == used.sum()
    expected = _move(proposals[used], design @ beta + mu)
    predicted = regressor.predict(features[used], proposals[used], labels[used])
    np.testing.assert_allclose(predicted, expected, rtol=1e-6, atol=1e-5)


def test_linear_relation_is_recovered_per_class():
    rng = np.random.default_rng(1)
    n, dim = 400, 10
    true_coef = [0.02 * rng.standard_normal((4, dim)) for _ in range(2)]
    true_bias = [np.array([0.01, -0.02, 0.03, 0.0]), np.array([-0.03, 0.02, 0.0, 0.05])]
    features = rng.standard_normal((n, dim))
    labels = rng.integers(0, 2, size=n)
    deltas = np.stack([true_coef[k] @ f + true_bias[k] for f, k in zip(features, labels)])
    proposals = _boxes(rng, n)
    gt = _move(proposals, deltas)
    regressor = fit_ridge_regressors(features, proposals, gt, labels, n_classes=3, lam=1e-6)
    for k in range(2):
        np.testing.assert_allclose(regressor.coef[k], true_coef[k], atol=1e-5)
        np.testing.assert_allclose(regressor.intercept[k], true_bias[k], atol=1e-6)
    assert regressor.trained.tolist() == [True, True, False]
    # Class 2 had no windows: its boxes come back unchanged.
    test_boxes = _boxes(rng, 3)
    np.testing.assert_allclose(regressor.predict(features[:3], test_boxes, [2, 2, 2]), test_boxes)


def test_only_windows_over_min_iou_train():
    # Window 0 is the gt itself (IoU 1), window 1 overlaps its gt exactly 0.5 (100/200: not > 0.5),
    # window 2 has IoU 0.8, window 3 has no object (label -1).
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=np.float64)
    proposals = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 12.5], [0, 0, 10, 12.5]], dtype=np.float64)
    np.testing.assert_allclose(paired_iou(proposals, gt), [1.0, 0.5, 0.8, 0.8])
    features = np.eye(4)
    regressor = fit_ridge_regressors(features, proposals, gt, [0, 0, 0, -1], n_classes=1, lam=1.0)
    assert regressor.n_samples.tolist() == [2]
    other = fit_ridge_regressors(features, proposals, gt, [0, 0, 0, -1], n_classes=1, lam=1.0, min_iou=0.45)
    assert other.n_samples.tolist() == [3]
    with pytest.raises(ValueError, match="n_classes"):
        fit_ridge_regressors(features, proposals, gt, [0, 0, 1, 0], n_classes=1)


def test_regression_improves_iou_on_held_out_noisy_boxes():
    # Features carry the window's displacement (a random linear code of the true deltas plus
    # noise), as conv features carry where the object sits in the window.
    rng = np.random.default_rng(2)
    dim = 32
    code = rng.standard_normal((4, dim))

    def make(n):
        gt = _boxes(rng, n)
        true = np.c_[0.12 * rng.standard_normal((n, 2)), 0.15 * rng.standard_normal((n, 2))]
        proposals = _move(gt, true)
        back = _targets(proposals, gt)  # what the regressor should output
        features = back @ code + 0.05 * rng.standard_normal((n, dim)) + 1.0
        return features.astype(np.float32), proposals, gt

    train_features, train_proposals, train_gt = make(1500)
    regressor = fit_ridge_regressors(
        train_features, train_proposals, train_gt, np.zeros(1500, int), n_classes=1, lam=10.0, feature_scale=0.5
    )
    features, proposals, gt = make(300)
    before = paired_iou(proposals, gt)
    after = paired_iou(regressor.predict(features, proposals, np.zeros(300, int)), gt)
    assert after.mean() > before.mean() + 0.1
    assert (after > before).mean() > 0.9


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    n, dim = 60, 5
    gt = _boxes(rng, n)
    proposals = _move(gt, 0.05 * rng.standard_normal((n, 4)))
    features = rng.standard_normal((n, dim)).astype(np.float32)
    labels = rng.integers(0, 2, size=n)
    regressor = fit_ridge_regressors(features, proposals, gt, labels, n_classes=3, lam=5.0, feature_scale=0.3)
    path = save_regressor(tmp_path / "bbox.npz", regressor, ["cat", "dog", "cow"])
    loaded, names = load_regressor(path)
    assert names == ["cat", "dog", "cow"]
    assert (loaded.feature_scale, loaded.lam, loaded.min_iou) == (0.3, 5.0, 0.5)
    np.testing.assert_array_equal(loaded.trained, regressor.trained)
    np.testing.assert_array_equal(loaded.n_samples, regressor.n_samples)
    np.testing.assert_array_equal(
        loaded.predict(features, proposals, labels), regressor.predict(features, proposals, labels)
    )
    with np.load(path, allow_pickle=False) as data:
        assert data["coef"].dtype == np.float32
    assert [p.name for p in tmp_path.iterdir()] == ["bbox.npz"]
