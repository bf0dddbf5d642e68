"""Stage "bbox_reg": training windows, feature scaling, and the fit on the tiny set."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sppcli.detector.bbox_reg import fit_ridge_regressors, load_regressor
from sppcli.ops.spp_pool import spp_pool_reference
from sppcli.pipeline import RunOptions, run_stage
from sppcli.stages import bbox_reg
from sppcli.stages.features import read_feature_item
from tests.stages.test_finetune import planner_for, pool_manifest, tiny_upstream
from tests.reference import iou_loop

CPU = RunOptions(device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_devkit, tiny_weights) -> Path:
    return tiny_upstream(tmp_path_factory, tiny_devkit, tiny_weights)


def _reference_windows(paths, feature_paths, min_iou):
    """Slow loop over the raw items: each window pooled from its conv5 map by the per-window
    reference, its best ground truth by float64 IoU."""
    feats, boxes, gts, labels, norms = [], [], [], [], []
    for path, feature_path in zip(paths, feature_paths):
        with h5py.File(path, "r") as f:
            item_boxes = f["boxes"][()].astype(np.float64)
            cells, scale = f["cells"][()], f["scale_index"][()]
            gt_boxes = f["gt_boxes"][()].astype(np.float64)
            gt_labels = f["gt_labels"][()]
        maps = read_feature_item(feature_path).maps
        item_feats = np.stack([spp_pool_reference(torch.from_numpy(maps[s].astype(np.float64)),
                                                  torch.from_numpy(c[None]).long())[0].numpy()
                               for c, s in zip(cells, scale)]).astype(np.float16)
        for i, box in enumerate(item_boxes):
            norms.append(np.linalg.norm(item_feats[i].astype(np.float64)))
            if len(gt_boxes) == 0:
                continue
            ious = [iou_loop(box, g) for g in gt_boxes]
            best = int(np.argmax(ious))
            if ious[best] >= min_iou:
                feats.append(item_feats[i])
                boxes.append(box)
                gts.append(gt_boxes[best])
                labels.append(int(gt_labels[best]))
    return np.array(feats), np.array(boxes), np.array(gts), np.array(labels), float(np.mean(norms))


def test_regressors_match_a_reference_built_from_the_raw_items(cache, tiny_devkit, tiny_weights):
    planner = planner_for(cache, tiny_devkit, tiny_weights)
    manifest, ran = run_stage(planner, bbox_reg, planner.plan("bbox_reg"), CPU)
    assert ran
    m = manifest.metrics
    pool = pool_manifest(planner)
    ids = planner.dataset("trainval").ids
    features = planner.store.manifest("features", pool.dataset, pool.upstream["features"])
    feats, boxes, gts, labels, mean_norm = _reference_windows([pool.item_path(i) for i in ids],
                                                              [features.item_path(i) for i in ids], 0.5)
    # 8 images of < 200 windows: the norm sample is every window
    assert m["mean_norm"] == pytest.approx(mean_norm, rel=1e-6)
    assert m["feature_scale"] == pytest.approx(20.0 / mean_norm, rel=1e-6)
    want = fit_ridge_regressors(feats, boxes, gts, labels, 8, lam=4000.0, feature_scale=m["feature_scale"])
    got, names = load_regressor(manifest.path("bbox_reg.npz"))
    assert names == m["classes"]
    np.testing.assert_array_equal(got.n_samples, want.n_samples)
    assert got.n_samples.sum() == m["training_windows"] > 0
    np.testing.assert_allclose(got.coef, want.coef, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.intercept, want.intercept, rtol=1e-6, atol=1e-9)
    for k, name in enumerate(names):
        assert m["per_class"][name]["windows"] == int(want.n_samples[k])
    _, ran = run_stage(planner, bbox_reg, planner.plan("bbox_reg"), CPU)
    assert not ran


def test_regression_improves_the_training_windows(cache, tiny_devkit, tiny_weights):
    # a weak ridge penalty on 100-odd windows of 1,600-d features: the fit on the training
    # windows themselves must move them toward their ground truth
    planner = planner_for(cache, tiny_devkit, tiny_weights, "bbox_reg.lam=1")
    manifest, _ = run_stage(planner, bbox_reg, planner.plan("bbox_reg"), CPU)
    m = manifest.metrics
    assert m["mean_iou_after"] > m["mean_iou_before"] + 0.1, (m["mean_iou_before"], m["mean_iou_after"])
    for entry in m["per_class"].values():
        if entry["windows"] and entry["mean_iou_before"] < 1.0:
            assert entry["mean_iou_after"] > entry["mean_iou_before"]


def test_bad_params_are_reported():
    from sppcli.config import BBoxRegParams

    with pytest.raises(ValueError, match="min_iou"):
        bbox_reg.check_params(BBoxRegParams(min_iou=1.5))
