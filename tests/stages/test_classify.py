"""Stage "classify": full-image SPP features, one-vs-rest linear SVMs, VOC classification AP."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sppcli.artifacts import ArtifactStore
from sppcli.nets.net_source import NetSource, load_net, net_record
from sppcli.nets.sppnet import normalize
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


def _colour_folder(root, shuffle_labels: bool = False, per_class: int = 36):
    """Three classes of noisy 40 x 40 images whose mean colour is the class: a random net's pooled
    conv5 separates them. With ``shuffle_labels`` the same images go to random class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    images = [(k, np.clip(colours[k] + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8))
              for k in range(3) for _ in range(per_class)]
    folders = rng.permutation([k for k, _ in images]) if shuffle_labels else [k for k, _ in images]
    for i, ((_, pixels), folder) in enumerate(zip(images, folders)):
        (root / f"class{folder}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"class{folder}" / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("shuffled", [False, True])
def test_folder_protocol_learns_real_classes_and_not_shuffled_ones(tiny_devkit, tiny_weights, tmp_path, shuffled):
    folder = _colour_folder(tmp_path / "colours", shuffle_labels=shuffled)
    config = tiny_config(tiny_devkit, tiny_weights, f"classify.folder={str(folder)!r}", "classify.size=64",
                         "classify.layer='pool5'", "classify.splits=3", "classify.train_per_class=20",
                         "classify.test_per_class=50")
    planner = Planner(ArtifactStore(tmp_path / "cache"), config)
    plan = planner.plan("classify")
    assert "pretrain" not in plan.upstream and "folder" in plan.external  # no VOC split, no features run
    manifest, ran = run_stage(planner, classify, plan, RunOptions(device="cpu"), log=lambda msg: None)
    m = manifest.metrics
    assert ran and m["protocol"] == "folder" and len(m["accuracy"]) == 3
    assert m["images_per_class"] == {"class0": 36, "class1": 36, "class2": 36} or shuffled
    assert m["accuracy_mean"] == pytest.approx(np.mean(m["accuracy"]))
    assert m["accuracy_std"] == pytest.approx(np.std(m["accuracy"]))
    if shuffled:  # a leak of test images into training would show here
        assert m["accuracy_mean"] < 0.6
    else:
        assert m["accuracy_mean"] > 0.9
    saved = json.loads((manifest.dir / "accuracy.json").read_text())
    assert [s["mean_class_accuracy"] for s in saved["splits"]] == m["accuracy"]
    assert all(s["test_images"] == 3 * 16 for s in saved["splits"]) or shuffled

    # an added image changes the key: the folder's content is an input
    from PIL import Image
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "class0" / "extra.png")
    assert Planner(ArtifactStore(tmp_path / "cache"), config).plan("classify").key != plan.key


def test_crop_view_and_the_6x6_level(tiny_devkit, tiny_weights):
    from sppcli.data.voc import VocDataset

    net, _ = load_net(tiny_weights)
    dataset = VocDataset(tiny_devkit, "test")
    crop = classify.ResizedImages(dataset, 72, "crop")[0]
    full = classify.ResizedImages(dataset, 72, "full")[0]
    assert crop.shape[1:] == (72, 72) and full.shape[1] == 72 and full.shape[2] > 72
    left = (full.shape[2] - 72) // 2
    assert torch.equal(crop, full[:, :, left:left + 72])  # the centre of the same resized image

    image = full
    with torch.no_grad():
        pooled = net.pooled(normalize(image[None]))[0]
    six = classify.image_features(net, image, "pool5_6x6")
    channels = net.trunk.out_channels
    assert six.shape == (channels * 36,)
    # the 6x6 level is an adaptive/paper max pool of the conv5 map into 6 x 6 bins: check it by
    # pooling the map with the SPP layer of a net whose only level is 6
    from sppcli.nets.spp_layer import SpatialPyramidPooling
    with torch.no_grad():
        conv5 = net.trunk(normalize(image[None]))
    reference = SpatialPyramidPooling([6], mode=net.spp.mode)(conv5)[0]
    assert torch.allclose(six, reference) and torch.allclose(pooled[classify.finest_level_slice(net)], six)


def test_classify_folder_from_the_command_line(tiny_devkit, tiny_weights, tmp_path):
    from click.testing import CliRunner

    from sppcli.cli import main
    from tests.conftest import tiny_sets

    folder = _colour_folder(tmp_path / "colours", per_class=24)
    args = ["classify", "--folder", str(folder), "--size", "64", "--layer", "pool5_6x6", "--view", "crop",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--set", "classify.splits=2",
            "--set", "classify.train_per_class=10"]
    for item in tiny_sets(tiny_devkit, tiny_weights):
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "mean class accuracy" in result.output and "over 2 splits (pool5_6x6, crop s=64)" in result.output
