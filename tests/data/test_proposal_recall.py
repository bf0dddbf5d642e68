import math

import numpy as np
import pytest

from sppcli.data.proposal_recall import best_overlaps, mabo, mean_best_overlap, per_class_recall, recall_at


def _iou_loop(a, b):
    """Slow float64 IoU of two internal boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_best_overlaps_hand_worked():
    gt = np.array([[0, 0, 10, 10], [20, 10, 40, 30]], dtype=np.float32)
    boxes = np.array([
        [0, 0, 5, 10],     # half of gt 0: IoU 50 / 100
        [5, 0, 15, 10],    # IoU 50 / 150 with gt 0
        [20, 10, 30, 30],  # half of gt 1: IoU 200 / 400
        [25, 15, 35, 25],  # inside gt 1: IoU 100 / 400
    ], dtype=np.float32)
    np.testing.assert_allclose(best_overlaps(gt, boxes), [0.5, 0.5])
    np.testing.assert_allclose(best_overlaps(gt, boxes[[1, 3]]), [1 / 3, 0.25])
    np.testing.assert_array_equal(best_overlaps(gt, np.zeros((0, 4))), [0.0, 0.0])
    assert best_overlaps(np.zeros((0, 4)), boxes).shape == (0,)


def test_best_overlaps_matches_loop_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(2, 40, 2))
    wh = rng.uniform(1, 60, size=(2, 40, 2))
    gt, boxes = (np.concatenate([xy[k], xy[k] + wh[k]], axis=1)[: 7 if k == 0 else 40] for k in range(2))
    expected = [max(_iou_loop(g, b) for b in boxes) for g in gt]
    np.testing.assert_allclose(best_overlaps(gt, boxes), expected, rtol=1e-12)


def test_recall_threshold_is_inclusive():
    best = np.array([1.0, 0.5, 1 / 3, 0.7, 0.69])
    assert recall_at(best, 0.5) == pytest.approx(4 / 5)
    assert recall_at(best, 0.7) == pytest.approx(2 / 5)
    assert math.isnan(recall_at(np.zeros(0), 0.5))


def test_mabo_is_mean_over_classes_not_boxes():
    best = np.array([1.0, 0.6, 0.5])
    labels = np.array([0, 0, 1])
    # ABO(class 0) = 0.8, ABO(class 1) = 0.5; classes weigh equally, boxes do not.
    assert mabo(best, labels) == pytest.approx(0.65)
    assert mean_best_overlap(best) == pytest.approx(0.7)
    assert math.isnan(mabo(np.zeros(0), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError):
        mabo(best, labels[:2])


def test_per_class_recall():
    table = per_class_recall(np.array([1.0, 0.4, 0.5]), np.array([0, 0, 2]), ["a", "b", "c"], 0.5)
    assert table["a"] == {"n_gt": 2, "recall": 0.5, "abo": pytest.approx(0.7)}
    assert table["b"]["n_gt"] == 0 and math.isnan(table["b"]["recall"]) and math.isnan(table["b"]["abo"])
    assert table["c"] == {"n_gt": 1, "recall": 1.0, "abo": 0.5}


def test_recall_by_size_buckets():
    from sppcli.data.proposal_recall import recall_by_size

    got = recall_by_size(np.array([0.9, 0.2, 0.6, 0.1, 0.7]), np.array([10, 20, 50, 300, 300]))
    assert got["< 32 px"] == {"n_gt": 2, "recall": 0.5}
    assert got["32-96 px"] == {"n_gt": 1, "recall": 1.0}
    assert got["96-256 px"]["n_gt"] == 0 and np.isnan(got["96-256 px"]["recall"])
    assert got[">= 256 px"] == {"n_gt": 2, "recall": 0.5}


def test_low_recall_advice_names_the_cause_and_the_option():
    from sppcli.data.proposal_recall import low_recall_advice

    metrics = {"recall@0.5": 0.197, "n_gt": 500, "mean_boxes": 900,
               "recall_by_size": {"< 32 px": {"n_gt": 300, "recall": 0.04}}}
    line = low_recall_advice(metrics, max_side=320, min_size=16, max_boxes=2000, image_long_side=1920)
    assert "19.7%" in line and "objects under 32 px are found 4%" in line
    assert "proposals.max_side = 320" in line and "--set proposals.max_side=1000" in line
    assert "proposals.min_size" in line
    assert low_recall_advice({"recall@0.5": 0.93}, 320, 16, 2000, 500) is None
    capped = low_recall_advice({"recall@0.5": 0.5, "n_gt": 10, "mean_boxes": 2000}, 500, 4, 2000, 500)
    assert "proposals.max_boxes = 2000" in capped
