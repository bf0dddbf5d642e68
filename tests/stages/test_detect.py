import numpy as np

from sppcli.config import DetectParams
from sppcli.stages.detect import select_detections


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


def test_per_image_cap_keeps_highest_scores():
    params = DetectParams(max_per_class_factor=100.0, max_per_image=2)
    cands = [_cands([0.1, 0.7, 0.4, 0.9], [0, 1, 0, 1])]
    kept = select_detections(cands, n_classes=2, params=params)
    assert kept[0].tolist() == [1, 3]


def test_no_candidates_anywhere():
    params = DetectParams()
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16))
    kept = select_detections([empty, empty], n_classes=3, params=params)
    assert [k.size for k in kept] == [0, 0]
