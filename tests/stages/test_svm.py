"""Stage "svm": negatives, one-pass training of all classes, skipped classes, saved models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sppcli.pipeline import RunOptions, run_stage
from sppcli.stages import finetune, svm
from sppcli.stages.pool import pooled_features_of
from sppcli.detector.svm import SvmParams, load_svms, train_class_svm
from sppcli.detector.windows import read_pool_windows
from tests.stages.test_finetune import planner_for, pool_manifest, tiny_upstream
from tests.reference import iou_loop

CPU = RunOptions(device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_devkit, tiny_weights) -> Path:
    return tiny_upstream(tmp_path_factory, tiny_devkit, tiny_weights)


def test_negatives_exclude_windows_near_the_class(cache, tiny_devkit, tiny_weights):
    planner = planner_for(cache, tiny_devkit, tiny_weights)
    pool = pool_manifest(planner)
    for image_id in planner.dataset("trainval").ids[:4]:
        windows = read_pool_windows(pool.item_path(image_id))
        per_class = svm.image_negatives(windows, 8, neg_iou=0.3, dedup_iou=0.7)
        boxes = windows.boxes.astype(np.float64)
        gts = windows.gt_boxes.astype(np.float64)
        for c, rows in enumerate(per_class):
            # reference: IoU < 0.3 with every ground truth of class c (float64 loop), then
            # greedy in window order: drop a window overlapping a kept one by more than 0.7
            candidates = [i for i in range(len(boxes))
                          if all(iou_loop(boxes[i], g) < 0.3 for g, lab in zip(gts, windows.gt_labels) if lab == c)]
            kept = []
            for i in candidates:
                if all(iou_loop(boxes[i], boxes[j]) <= 0.7 for j in kept):
                    kept.append(i)
            assert rows.tolist() == kept, (image_id, c)
            assert not windows.is_gt[rows][windows.gt_label[rows] == c].any()


def test_release_dedup_keeps_one_window_per_cells_and_scale(cache, tiny_devkit, tiny_weights):
    planner = planner_for(cache, tiny_devkit, tiny_weights)
    pool = pool_manifest(planner)
    more = 0
    for image_id in planner.dataset("trainval").ids[:4]:
        windows = read_pool_windows(pool.item_path(image_id))
        per_class = svm.image_negatives(windows, 8, neg_iou=0.3, dedup_iou=0.7, dedup="cells")
        paper = svm.image_negatives(windows, 8, neg_iou=0.3, dedup_iou=0.7, dedup="iou")
        seen = {}  # reference: the first row of every (cells, scale) over all the image's windows
        for i, (cells, scale) in enumerate(zip(windows.cells.tolist(), windows.scale_index.tolist())):
            seen.setdefault((tuple(cells), scale), i)
        first = set(seen.values())
        for c, rows in enumerate(per_class):
            candidates = [i for i in range(len(windows)) if windows.overlaps[i, c] < 0.3]
            assert rows.tolist() == [i for i in candidates if i in first], (image_id, c)
            more += len(rows) - len(paper[c])
    assert more > 0  # the release's rule keeps more negatives than the paper's
    with pytest.raises(ValueError, match="svm.neg_dedup"):
        svm.image_negatives(windows, 8, 0.3, 0.7, dedup="boxes")


def test_one_pass_equals_one_training_per_class():
    rng = np.random.default_rng(0)
    dim, n_images = 6, 7
    positives = [rng.normal(1.0, 1.0, (5, dim)).astype(np.float32), np.zeros((0, dim), np.float32),
                 rng.normal(-1.0, 1.0, (3, dim)).astype(np.float32)]
    batches = [[rng.normal(0.0, 1.0, (int(rng.integers(0, 30)), dim)).astype(np.float32) for _ in range(3)]
               for _ in range(n_images)]
    params = SvmParams(retrain_limit=20)
    lines = []
    results = svm.train_all_classes(positives, iter(batches), params, ["a", "b", "c"],
                                    lambda name, line: lines.append(name))
    assert sorted(results) == [0, 2]  # class b has no positives: not trained
    for c in (0, 2):
        alone = train_class_svm(positives[c], [b[c] for b in batches], params)
        np.testing.assert_array_equal(results[c].w, alone.w)
        assert results[c].b == alone.b and results[c].history == alone.history
    assert lines.count("a") == len(results[0].history) and "b" not in lines


def test_a_failing_class_stops_the_pass():
    positives = [np.ones((2, 3), np.float32)]

    def images():
        yield [np.ones((2, 3), np.float32)]
        yield [np.ones((2, 4), np.float32)]  # wrong width: train_class_svm raises
        for _ in range(100):
            yield [np.ones((2, 3), np.float32)]

    with pytest.raises(ValueError, match="negative batch 1"):
        svm.train_all_classes(positives, images(), SvmParams(), ["a"], lambda name, line: None)


def test_pool5_svms_are_saved_and_up_to_date(cache, tiny_devkit, tiny_weights):
    planner = planner_for(cache, tiny_devkit, tiny_weights, "svm.layer=pool5")
    plan = planner.plan("svm")
    assert "finetune" not in plan.upstream
    manifest, ran = run_stage(planner, svm, plan, CPU)
    assert ran
    m = manifest.metrics
    models, scale, names = load_svms(manifest.path("svms.npz"))
    assert names == m["classes"] and scale == pytest.approx(m["feature_scale"])
    assert m["head"] == {"layer": "pool5", "pool_levels": [1, 2, 3, 6], "pooled_dim": 1600, "source": "pool",
                         "path": None, "arch": None}
    assert m["feature_dim"] == 1600
    for name in names:
        assert (models[name] is not None) == (m["positives"][name] > 0) == (name in m["trained_classes"])
        if models[name] is not None:
            assert models[name].w.shape == (1600,)
            history = m["history"][name]
            assert history and {"pos_loss", "neg_loss", "reg", "objective"} <= history[-1].keys()
    # scaled features of the training windows have mean norm target_norm
    assert m["mean_norm"] * scale == pytest.approx(20.0)
    _, ran = run_stage(planner, svm, plan, CPU)
    assert not ran


def test_fc7_on_the_finetuned_head(cache, tiny_devkit, tiny_weights):
    from sppcli.nets.heads import detection_head, fc_features
    from sppcli.nets.net_source import load_net

    planner = planner_for(cache, tiny_devkit, tiny_weights)  # defaults: fc7, finetuned
    run_stage(planner, finetune, planner.plan("finetune"), CPU)
    manifest, _ = run_stage(planner, svm, planner.plan("svm"), CPU)
    head = manifest.metrics["head"]
    assert head["source"] == "finetune" and head["layer"] == "fc7" and Path(head["path"]).is_file()
    models, scale, names = load_svms(manifest.path("svms.npz"))
    assert all(models[n].w.shape == (64,) for n in manifest.metrics["trained_classes"])
    # the recorded head recomputes the features the SVMs were trained on (also by hand from the
    # fine-tuned checkpoint): a class's positives score above the mean of its negatives
    net, _ = load_net(head["path"])
    by_hand = detection_head(net, head["pool_levels"])
    layer = svm.for_svm(manifest)
    pool = pool_manifest(planner)
    pooled = pooled_features_of(pool, planner.store.manifest("features", pool.dataset, pool.upstream["features"]))
    for image_id in planner.dataset("trainval").ids[:3]:
        windows = read_pool_windows(pool.item_path(image_id))
        rows = pooled.window_rows(windows)
        feats = layer(rows) * scale
        np.testing.assert_array_equal(feats, fc_features(by_hand, rows, "fc7") * scale)
        for g in np.flatnonzero(windows.is_gt):
            name = names[windows.gt_label[g]]
            scores = feats @ models[name].w + models[name].b
            negatives = windows.overlaps[:, windows.gt_label[g]] < 0.3
            assert scores[g] > scores[negatives].mean()


def test_a_class_without_positives_is_skipped(tmp_path_factory, tiny_devkit, tiny_weights):
    classes = "dataset.classes=['disc','ring','triangle','cross','star','crescent','stripes','checker','zebra']"
    cache = tiny_upstream(tmp_path_factory, tiny_devkit, tiny_weights, classes)
    planner = planner_for(cache, tiny_devkit, tiny_weights, classes, "svm.layer=pool5")
    manifest, _ = run_stage(planner, svm, planner.plan("svm"), CPU)
    m = manifest.metrics
    assert m["skipped_classes"] == [{"class": "zebra", "reason": "no positives"}]
    assert "zebra" not in m["trained_classes"] and m["positives"]["zebra"] == 0
    models, _, names = load_svms(manifest.path("svms.npz"))
    assert names[-1] == "zebra" and models["zebra"] is None
    assert sum(models[n] is not None for n in names) == len(m["trained_classes"]) >= 1


def test_an_interrupted_pass_ends_every_trainer():
    positives = [np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)]

    def images():
        for _ in range(3):
            yield [np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        svm.train_all_classes(positives, images(), SvmParams(), ["a", "b"], lambda name, line: None)
