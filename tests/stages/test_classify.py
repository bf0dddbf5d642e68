"""Stage "classify": full-image SPP features, one-vs-rest linear SVMs, VOC classification AP."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sppcli.artifacts import ArtifactStore
from sppcli.nets.net_source import NetSource, load_net, net_record
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import classify
from sppcli.data.voc_eval import average_precision
from tests.conftest import tiny_config


def test_classification_ap_hand_worked():
    # ranked: +, -, 0 (ignored), +, -, +   -> 3 positives
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, -1, 0, 1, -1, 1])
    # recall / precision after each counted image: 1/3 @ 1, 1/3 @ 1/2, 2/3 @ 2/3, 2/3 @ 2/4, 1 @ 3/5
    # 11-point: t = 0 .. 0.3 -> 1 (4 points); 0.4 .. 0.6 -> 2/3 (3 points); 0.7 .. 1 -> 3/5 (4 points)
    expected = (4 * 1 + 3 * (2 / 3) + 4 * (3 / 5)) / 11
    assert math.isclose(classify.classification_ap(scores, labels), expected, rel_tol=1e-12)
    # a difficult-only image on top: precision is undefined there and skipped
    assert math.isclose(classify.classification_ap(np.array([2.0, 1.0]), np.array([0, 1])), 1.0)
    assert math.isnan(classify.classification_ap(np.array([1.0, 0.5]), np.array([-1, 0])))


def test_classification_ap_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        scores = np.round(rng.normal(size=n), 1)  # ties: the stable order decides
        labels = rng.choice([-1, 0, 1], size=n, p=[0.5, 0.1, 0.4])
        if not (labels > 0).any():
            continue
        order = sorted(range(n), key=lambda i: -scores[i])  # Python's sort is stable too
        tp = fp = 0
        rec, prec = [], []
        for i in order:
            tp += labels[i] > 0
            fp += labels[i] < 0
            rec.append(tp / (labels > 0).sum())
            prec.append(tp / (tp + fp) if tp + fp else float("nan"))
        assert math.isclose(classify.classification_ap(scores, labels),
                            average_precision(np.array(rec), np.array(prec), "voc2007"), rel_tol=1e-12)


def test_image_labels_follow_the_devkit_flags():
    gts = {
        "a": SimpleNamespace(labels=np.array([0, 1, 1]), difficult=np.array([False, True, False])),
        "b": SimpleNamespace(labels=np.array([2, 2]), difficult=np.array([True, True])),
        "c": SimpleNamespace(labels=np.array([], dtype=np.int64), difficult=np.array([], dtype=bool)),
    }
    dataset = SimpleNamespace(ids=("a", "b", "c"), classes=("x", "y", "z"), ground_truth=gts.__getitem__)
    np.testing.assert_array_equal(classify.image_labels(dataset), [[1, 1, -1], [-1, -1, 0], [-1, -1, -1]])


def test_train_svms_skips_difficult_rows_and_one_sided_classes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    labels = np.full((40, 2), -1, dtype=np.int8)
    labels[x[:, 0] > 0, 0] = 1
    labels[:3, 0] = 0  # difficult: must not influence training
    weights, bias, trained = classify.train_svms(x, labels, C=1.0)
    assert trained.tolist() == [True, False]
    assert not weights[1].any() and bias[1] == 0
    keep = labels[:, 0] != 0
    predicted = (x[keep] @ weights[0] + bias[0]) > 0
    assert np.mean(predicted == (labels[keep, 0] > 0)) > 0.9
    # label-0 rows are as good as absent
    without = classify.train_svms(x[3:], labels[3:], C=1.0)
    np.testing.assert_allclose(without[0][0], weights[0], rtol=1e-6)


def _fake_features_manifest(planner, weights_path):
    """A complete features artifact for the plan classify reads: only its metrics["net"] matters."""
    up = planner.plan("classify").upstream["features_net"]
    net, arch = load_net(weights_path)
    run = planner.store.begin(up.stage, up.dataset, up.version, up.params, up.upstream_keys, up.external)
    return run.finish(metrics={"net": net_record(NetSource("weights", weights_path), net, arch)})


@pytest.mark.parametrize("layer", ["fc7", "pool5"])
def test_classify_stage(tiny_devkit, tiny_weights, tmp_path, layer):
    config = tiny_config(tiny_devkit, tiny_weights, f"classify.layer={layer}")
    planner = Planner(ArtifactStore(tmp_path / "cache"), config)
    _fake_features_manifest(planner, tiny_weights)
    manifest, ran = run_stage(planner, classify, planner.plan("classify"), RunOptions(device="cpu"),
                              log=lambda msg: None)
    assert ran and manifest.complete
    m = manifest.metrics
    classes = list(planner.dataset("test").classes)
    assert set(m["ap"]) == set(classes)
    values = [v for v in m["ap"].values() if v is not None]
    assert values and all(0.0 <= v <= 1.0 for v in values)
    assert math.isclose(m["mAP"], float(np.mean(values)))
    assert all((m["ap"][c] is None) == (m["positives"][c] == 0) for c in classes)
    assert m["layer"] == layer and m["size"] == config.classify.size

    svms = np.load(manifest.dir / "svms.npz")
    channels = 32  # 256 * net.width 0.125
    dim = config.net.hidden if layer == "fc7" else channels * 50
    assert svms["weights"].shape == (len(classes), dim) == (len(classes), m["feature_dim"])
    assert svms["bias"].shape == (len(classes),) and str(svms["layer"]) == layer
    ap_json = json.loads((manifest.dir / "ap.json").read_text())
    assert ap_json["ap"] == m["ap"] and ap_json["mAP"] == m["mAP"]

    # the stored test scores reproduce the APs
    scores = np.load(manifest.dir / "scores.npz")
    assert list(scores["ids"]) == list(planner.dataset("test").ids)
    for k, name in enumerate(classes):
        ap = classify.classification_ap(scores["scores"][:, k], scores["labels"][:, k])
        assert (math.isnan(ap) and m["ap"][name] is None) or math.isclose(ap, m["ap"][name])


def test_full_image_features_are_l2_normalised_and_any_aspect(tiny_devkit, tiny_weights):
    from sppcli.data.voc import VocDataset

    net, _ = load_net(tiny_weights)
    dataset = VocDataset(tiny_devkit, "test")
    image = classify.ResizedImages(dataset, 72)[0]
    assert min(image.shape[1:]) == 72 and image.shape[1] != image.shape[2]
    feats = classify.split_features(net, dataset, 72, "fc6", "cpu", 1, "test")
    assert feats.shape == (len(dataset), net.head.hidden)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
