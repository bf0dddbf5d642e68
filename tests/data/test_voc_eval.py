"""VOC evaluation: hand-worked cases and a line-by-line transliteration of VOCevaldet.m."""
import math

import numpy as np
import pytest

from sppcli.data.voc_eval import (
    VOC2007_RECALL_THRESHOLDS,
    average_precision,
    evaluate,
    evaluate_class,
    format_ap_table,
)

BOX = np.array([0.0, 0.0, 10.0, 10.0])


def _dets(rows):
    """rows: (image_id, score, box) tuples -> the (ids, scores, boxes) triple."""
    ids = [r[0] for r in rows]
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    boxes = np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4)
    return ids, scores, boxes


def _gt(boxes, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if difficult is None:
        difficult = np.zeros(len(boxes), dtype=bool)
    return boxes, np.asarray(difficult, dtype=bool)


def test_perfect_detector_has_ap_one_under_both_metrics():
    gt = {"a": _gt([[0, 0, 10, 10], [20, 20, 40, 30]]), "b": _gt([[5, 5, 15, 25]])}
    dets = _dets([("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [20, 20, 40, 30]), ("b", 0.7, [5, 5, 15, 25])])
    for metric in ("voc2007", "voc2010"):
        result = evaluate_class(gt, dets, metric=metric)
        assert result.ap == pytest.approx(1.0)
        assert result.n_positives == 3
        np.testing.assert_allclose(result.recall, [1 / 3, 2 / 3, 1.0])
        np.testing.assert_allclose(result.precision, [1.0, 1.0, 1.0])


def test_eleven_point_and_area_ap_differ_with_exact_values():
    # 4 positives; ranked outcomes TP, FP, TP, FP, FP.
    # recall    = .25, .25, .5,  .5, .5
    # precision = 1,   .5,  2/3, .5, .4
    # 11-point: t in {0,.1,.2} -> max prec = 1; t in {.3,.4,.5} -> 2/3; t >= .6 -> 0
    #   AP = (3*1 + 3*2/3) / 11 = 5/11
    # area: envelope at the recall steps 0->.25 is 1, .25->.5 is 2/3, .5->1 is 0
    #   AP = .25*1 + .25*2/3 = 5/12
    gt = {"a": _gt([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]])}
    dets = _dets(
        [
            ("a", 0.9, [0, 0, 10, 10]),  # TP
            ("a", 0.8, [100, 100, 110, 110]),  # FP: no overlap
            ("a", 0.7, [20, 0, 30, 10]),  # TP
            ("a", 0.6, [100, 0, 110, 10]),  # FP
            ("a", 0.5, [0, 50, 10, 60]),  # FP
        ]
    )
    r07 = evaluate_class(gt, dets, metric="voc2007")
    r10 = evaluate_class(gt, dets, metric="voc2010")
    np.testing.assert_allclose(r07.recall, [0.25, 0.25, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(r07.precision, [1.0, 0.5, 2 / 3, 0.5, 0.4])
    assert r07.ap == pytest.approx(5 / 11, abs=1e-12)
    assert r10.ap == pytest.approx(5 / 12, abs=1e-12)


def test_eleven_point_thresholds_reproduce_matlab_colon_rounding():
    # MATLAB's 0:0.1:1 holds 0.30000000000000004, so recall exactly 3/10 misses t = 0.3:
    # three TPs out of 10 positives give (1 + 1 + 1) / 11, not 4 / 11.
    assert VOC2007_RECALL_THRESHOLDS[3] == 0.30000000000000004
    assert VOC2007_RECALL_THRESHOLDS[6] == 0.6 and VOC2007_RECALL_THRESHOLDS[7] == 0.7
    recall = np.array([0.1, 0.2, 3 / 10])
    precision = np.ones(3)
    assert average_precision(recall, precision, "voc2007") == pytest.approx(3 / 11, abs=1e-15)
    # Area AP has no thresholds: 0.3 * 1.
    assert average_precision(recall, precision, "voc2010") == pytest.approx(0.3, abs=1e-15)


def test_difficult_objects_are_ignored_and_never_taken():
    # gt 0 is normal, gt 1 difficult; two detections on the difficult one are both ignored
    # (neither TP nor FP, and the second is not a duplicate), the third is a TP.
    gt = {"a": _gt([[0, 0, 10, 10], [20, 0, 30, 10]], difficult=[False, True])}
    dets = _dets([("a", 0.9, [20, 0, 30, 10]), ("a", 0.8, [20, 0, 30, 10]), ("a", 0.7, [0, 0, 10, 10])])
    result = evaluate_class(gt, dets)
    assert result.n_positives == 1
    np.testing.assert_array_equal(result.is_tp, [False, False, True])
    np.testing.assert_array_equal(result.is_fp, [False, False, False])
    np.testing.assert_allclose(result.recall, [0.0, 0.0, 1.0])
    assert np.isnan(result.precision[:2]).all() and result.precision[2] == 1.0
    assert result.ap == pytest.approx(1.0)
    assert evaluate_class(gt, dets, metric="voc2010").ap == pytest.approx(1.0)


def test_detection_whose_best_match_is_difficult_does_not_fall_back():
    # The first detection overlaps the difficult gt 1 with IoU 1 and the normal gt 0 with
    # IoU 90/110 = 0.818: the devkit picks the best (difficult) one and ignores the detection,
    # leaving gt 0 free for the second detection, which is then a TP, not a duplicate.
    gt = {"a": _gt([[0, 0, 10, 10], [1, 0, 11, 10]], difficult=[False, True])}
    dets = _dets([("a", 0.9, [1, 0, 11, 10]), ("a", 0.8, [0, 0, 10, 10])])
    result = evaluate_class(gt, dets)
    np.testing.assert_array_equal(result.is_tp, [False, True])
    np.testing.assert_array_equal(result.is_fp, [False, False])
    assert result.ap == pytest.approx(1.0)


def test_duplicates_are_false_positives_even_when_another_object_is_free():
    # gt A = (0,0,10,10), gt B = (5,0,15,10). det1 = A -> TP.
    # det2 = (2,0,12,10): IoU(A) = 80/120 = 0.667, IoU(B) = 70/130 = 0.538. Its best object A is
    # taken, so it is an FP although B is above 0.5 and free (the devkit never looks further).
    gt = {"a": _gt([[0, 0, 10, 10], [5, 0, 15, 10]])}
    dets = _dets([("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [2, 0, 12, 10]), ("a", 0.7, [0, 0, 10, 10.5])])
    result = evaluate_class(gt, dets)
    np.testing.assert_array_equal(result.is_tp, [True, False, False])
    np.testing.assert_array_equal(result.is_fp, [False, True, True])
    # recall .5 .5 .5; precision 1 .5 1/3 -> 11-point: t<=.5 -> 1 (6 thresholds), else 0.
    assert result.ap == pytest.approx(6 / 11)


def test_class_without_detections_has_ap_zero():
    gt = {"a": _gt([[0, 0, 10, 10]]), "b": _gt(np.zeros((0, 4)))}
    result = evaluate_class(gt, _dets([]))
    assert result.ap == 0.0 and result.n_positives == 1
    assert result.recall.shape == (0,) and result.precision.shape == (0,)
    assert average_precision(np.zeros(0), np.zeros(0), "voc2010") == 0.0


def test_tied_scores_keep_input_order():
    # npos = 1; two detections with equal scores, one TP and one FP.
    # Input order FP, TP: recall 0, 1; precision 0, .5 -> AP = .5 (both metrics).
    # Input order TP, FP: recall 1, 1; precision 1, .5 -> AP = 1.
    gt = {"a": _gt([[0, 0, 10, 10]])}
    fp = ("a", 0.5, [50, 50, 60, 60])
    tp = ("a", 0.5, [0, 0, 10, 10])
    first_fp = evaluate_class(gt, _dets([fp, tp]))
    first_tp = evaluate_class(gt, _dets([tp, fp]))
    np.testing.assert_array_equal(first_fp.order, [0, 1])
    np.testing.assert_array_equal(first_fp.is_tp, [False, True])
    assert first_fp.ap == pytest.approx(0.5)
    assert evaluate_class(gt, _dets([fp, tp]), metric="voc2010").ap == pytest.approx(0.5)
    assert first_tp.ap == pytest.approx(1.0)
    # A lower score placed first in the input is still evaluated after the higher one.
    later = evaluate_class(gt, _dets([("a", 0.1, [0, 0, 10, 10]), fp]))
    np.testing.assert_array_equal(later.order, [1, 0])


def test_iou_exactly_half_matches_as_in_the_devkit():
    # gt area 100; det (0,0,10,20) has area 200 and contains the gt: IoU = 100/200 = 0.5 exactly.
    # The devkit tests ovmax >= 0.5, so this is a TP; a hair larger box is an FP.
    gt = {"a": _gt([[0, 0, 10, 10]])}
    assert evaluate_class(gt, _dets([("a", 1.0, [0, 0, 10, 20])])).is_tp.tolist() == [True]
    assert evaluate_class(gt, _dets([("a", 1.0, [0, 0, 10, 20.001])])).is_fp.tolist() == [True]
    # A stricter threshold is honoured.
    assert evaluate_class(gt, _dets([("a", 1.0, [0, 0, 10, 20])]), iou_threshold=0.6).is_fp.tolist() == [True]


def test_unknown_image_is_an_error():
    with pytest.raises(KeyError, match="zzz"):
        evaluate_class({"a": _gt([BOX])}, _dets([("zzz", 1.0, BOX)]))


def test_evaluate_splits_classes_and_skips_classes_without_positives_in_map():
    # Class "cat": 1 positive found -> AP 1. Class "dog": 2 positives, one found after an FP:
    # recall 0, .5; precision 0, .5 -> 11-point AP = 6 * .5 / 11. Class "cow": only a difficult
    # object -> no positives, AP 0, excluded from the mean.
    gt = {
        "i1": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0, 1]), np.array([False, False])),
        "i2": (np.array([[0, 0, 5, 5], [10, 10, 20, 20]]), np.array([1, 2]), np.array([False, True])),
    }
    dets = {
        "cat": _dets([("i1", 0.9, [0, 0, 10, 10])]),
        "dog": _dets([("i2", 0.9, [30, 30, 40, 40]), ("i1", 0.8, [20, 20, 30, 30])]),
    }
    result = evaluate(gt, dets, ["cat", "dog", "cow"])
    assert result.ap["cat"] == pytest.approx(1.0)
    assert result.ap["dog"] == pytest.approx(3 / 11)
    assert result.ap["cow"] == 0.0 and result.per_class["cow"].n_positives == 0
    assert result.mAP == pytest.approx((1.0 + 3 / 11) / 2)
    with pytest.raises(KeyError, match="horse"):
        evaluate(gt, {"horse": _dets([])}, ["cat"])


def test_format_ap_table_layout():
    table = format_ap_table(
        {"SPP ftfc7": {"aeroplane": 0.655, "tvmonitor": 0.647}, "RCNN": {"aeroplane": 0.642}},
        ["aeroplane", "tvmonitor"],
    )
    assert table.splitlines() == [
        "method     mAP aero   tv",
        "SPP ftfc7 65.1 65.5 64.7",
        "RCNN      64.2 64.2    -",
    ]


# --------------------------------------------------------------------------------------------
# Slow reference: VOCevaldet.m transliterated with 1-based inclusive VOC boxes and "+1" areas.


def _devkit_reference(gt, dets, minoverlap=0.5):
    ids, confidence, bb_internal = dets
    to_voc = lambda b: [b[0] + 1, b[1] + 1, b[2], b[3]]  # noqa: E731 (internal -> VOC pixels)
    npos = sum(int((~d).sum()) for _, d in gt.values())
    det_flags = {k: [False] * len(d) for k, (_, d) in gt.items()}
    si = sorted(range(len(confidence)), key=lambda i: -confidence[i])  # Python's sort is stable
    tp, fp = [], []
    for d in si:
        bb = to_voc(bb_internal[d])
        gt_boxes, diff = gt[ids[d]]
        ovmax, jmax = -math.inf, None
        for j, g in enumerate(gt_boxes):
            bbgt = to_voc(g)
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                    + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        t = f = 0
        if ovmax >= minoverlap:
            if not diff[jmax]:
                if not det_flags[ids[d]][jmax]:
                    t = 1
                    det_flags[ids[d]][jmax] = True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    ctp, cfp, rec, prec = 0, 0, [], []
    for t, f in zip(tp, fp):
        ctp += t
        cfp += f
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp) if ctp + cfp else math.nan)
    ap = 0.0
    for t in VOC2007_RECALL_THRESHOLDS:
        p = [pr for r, pr in zip(rec, prec) if r >= t and not math.isnan(pr)]
        ap += (max(p) if p else 0.0) / 11
    return np.array(tp, bool), np.array(fp, bool), np.array(rec), ap


def test_matches_devkit_transliteration_on_random_data():
    rng = np.random.default_rng(0)
    for trial in range(20):
        gt, rows = {}, []
        for i in range(6):
            n = int(rng.integers(0, 4))
            xy = rng.integers(0, 60, size=(n, 2))
            wh = rng.integers(5, 40, size=(n, 2))
            boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float64)
            gt[f"im{i}"] = _gt(boxes, rng.random(n) < 0.25)
            for box in boxes:  # jittered true detections, sometimes duplicated
                for _ in range(int(rng.integers(0, 3))):
                    rows.append((f"im{i}", float(rng.integers(0, 5)), box + rng.integers(-6, 7, size=4)))
            for _ in range(int(rng.integers(0, 4))):  # clutter
                xy = rng.integers(0, 80, size=2)
                rows.append((f"im{i}", float(rng.integers(0, 5)), np.concatenate([xy, xy + rng.integers(5, 30, 2)])))
        if sum(int((~d).sum()) for _, d in gt.values()) == 0:
            continue
        dets = _dets(rows)  # integer scores: many ties
        tp, fp, rec, ap = _devkit_reference(gt, dets)
        result = evaluate_class(gt, dets)
        np.testing.assert_array_equal(result.is_tp, tp, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(result.is_fp, fp, err_msg=f"trial {trial}")
        np.testing.assert_allclose(result.recall, rec)
        assert result.ap == pytest.approx(ap, abs=1e-12)


def test_found_and_false_counts_what_a_person_sees_hand_worked():
    from sppcli.data.voc_eval import found_and_false

    gt = {"a": (np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0, 0]), np.array([False, True])),
          "b": (np.array([[0, 0, 20, 20]]), np.array([1]), np.array([False]))}
    dets = {"cat": (["a", "a", "a", "a"], np.array([0.9, 0.8, 0.7, 0.6]),
                    np.array([[0, 0, 10, 10],      # finds a's first object
                              [0, 0, 10, 9],       # a duplicate of it: false
                              [30, 30, 40, 40],    # on nothing: false
                              [50, 50, 60, 60]])),  # the difficult one: neither
            "dog": (["b", "a"], np.array([0.5, 0.4]), np.array([[1, 1, 20, 20], [0, 0, 10, 10]]))}  # found; wrong class
    count = found_and_false(gt, dets, ["cat", "dog"])
    assert (count.images, count.objects, count.found, count.false_boxes) == (2, 2, 2, 3)
    assert str(count) == "2 of 2 objects found, 3 false boxes in 2 images"
