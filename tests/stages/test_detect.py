"""detect: the per-class cap, the per-class budget over the split, and the test-time order."""
import numpy as np
import pytest

from sppcli.config import DetectParams
from sppcli.stages.detect import class_detections, select_detections


def _cands(scores, labels):
    scores = np.asarray(scores, dtype=np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (len(scores), 1))
    return boxes, scores, np.asarray(labels, dtype=np.int16)


def test_per_class_budget_keeps_the_best_over_the_whole_set():
    # 2 images, budget = 1.0 x 2 images = 2 windows per class over the set.
    params = DetectParams(max_per_class_factor=1.0, max_per_image=100)
    cands = [_cands([0.9, 0.1, 0.5], [0, 0, 1]), _cands([0.3, 0.8, -0.2], [0, 1, 1])]
    kept = select_detections(cands, n_classes=2, params=params)
    # class 0 scores: 0.9, 0.1, 0.3 -> keep 0.9 and 0.3; class 1: 0.5, 0.8, -0.2 -> keep 0.8 and 0.5
    assert kept[0].tolist() == [0, 2]
    assert kept[1].tolist() == [0, 1]


def test_per_image_cap_is_per_class():
    params = DetectParams(max_per_class_factor=100.0, max_per_image=2)
    cands = [_cands([0.1, 0.7, 0.4, 0.9, 0.2, 0.3], [0, 1, 0, 1, 0, 1])]
    kept = select_detections(cands, n_classes=2, params=params)
    assert kept[0].tolist() == [1, 2, 3, 4]  # class 0: 0.4, 0.2; class 1: 0.9, 0.7


def test_three_classes_of_sixty_keep_all_under_a_cap_of_100():
    params = DetectParams(max_per_class_factor=1000.0, max_per_image=100)
    rng = np.random.default_rng(0)
    cands = [_cands(rng.standard_normal(180), np.repeat([0, 1, 2], 60))]
    kept = select_detections(cands, n_classes=3, params=params)
    assert kept[0].size == 180


def test_cap_applies_before_the_budget():
    # image 0 has three class-0 windows above everything in image 1; cap 2 per image leaves room
    # in the budget (3) for image 1's best, as the releases' per-image top-k before the set's top-k
    params = DetectParams(max_per_class_factor=1.5, max_per_image=2)
    cands = [_cands([0.9, 0.8, 0.7], [0, 0, 0]), _cands([0.5, 0.1], [0, 0])]
    kept = select_detections(cands, n_classes=1, params=params)
    assert kept[0].tolist() == [0, 1] and kept[1].tolist() == [0]


def _shift_right(boxes, rows, dx):
    moved = boxes[rows].astype(np.float64).copy()
    moved[:, [0, 2]] += dx
    return moved


def test_release_order_suppresses_before_regressing():
    # A (0.9) and B (0.8) overlap with IoU 0.82 as proposed; regression moves B 30 px right, where
    # it no longer overlaps A. The release runs NMS first, so B is gone; regressing first keeps it.
    boxes = np.array([[10, 10, 60, 60], [14, 10, 64, 60], [200, 10, 240, 60]], np.float32)
    scores = np.array([0.9, 0.8, -3.0], np.float32)  # the third is under the -1.5 threshold

    def regress(rows):
        moved = _shift_right(boxes, rows, 0.0)
        moved[rows == 1, 0::2] += 30
        return moved

    release, rs = class_detections(boxes, scores, regress, 320, 240, DetectParams(order="release"))
    first, fs = class_detections(boxes, scores, regress, 320, 240, DetectParams(order="regress_first"))
    assert rs.tolist() == pytest.approx([0.9]) and release.tolist() == [[10, 10, 60, 60]]
    assert fs.tolist() == pytest.approx([0.9, 0.8]) and first[1].tolist() == [44, 10, 94, 60]
    # without a regressor both orders are threshold + NMS + cap
    a, _ = class_detections(boxes, scores, None, 320, 240, DetectParams(order="release"))
    b, _ = class_detections(boxes, scores, None, 320, 240, DetectParams(order="regress_first"))
    assert a.tolist() == b.tolist() == [[10, 10, 60, 60]]


def test_release_order_caps_before_regressing_and_clips():
    # 5 disjoint windows, cap 3: the release regresses only the 3 best, then clips to the image
    boxes = np.array([[i * 50, 0, i * 50 + 40, 40] for i in range(5)], np.float32)
    scores = np.array([0.1, 0.5, 0.4, 0.3, 0.2], np.float32)
    seen = []

    def regress(rows):
        seen.append(sorted(rows.tolist()))
        return _shift_right(boxes, rows, 100.0)

    out, out_scores = class_detections(boxes, scores, regress, 260, 240, DetectParams(max_per_image=3))
    assert seen == [[1, 2, 3]] and out_scores.tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert out[:, 2].max() <= 260 and out[0].tolist() == [150, 0, 190, 40]
    with pytest.raises(ValueError, match="detect.order"):
        class_detections(boxes, scores, None, 260, 240, DetectParams(order="sideways"))


def test_no_candidates_anywhere():
    params = DetectParams()
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16))
    kept = select_detections([empty, empty], n_classes=3, params=params)
    assert [k.size for k in kept] == [0, 0]


def test_bad_params_are_refused_before_any_work():
    from sppcli.stages.detect import check_params

    check_params(DetectParams())
    for bad, match in ((DetectParams(precision="float8"), "detect.precision"), (DetectParams(svd_ranks=(5,)), "svd_ranks"),
                       (DetectParams(order="x"), "detect.order"), (DetectParams(max_per_image=0), "max_per_image")):
        with pytest.raises(ValueError, match=match):
            check_params(bad)
