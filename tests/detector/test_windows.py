"""Window selection rules and the pool-item readers of sppcli.detector.windows."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from sppcli.detector.windows import (
    FinetuneSampler,
    WindowSet,
    batch_counts,
    distinct_windows,
    finetune_selection,
    max_overlap,
    norm_sample,
    read_feature_rows,
    read_pool_windows,
    regression_selection,
    svm_negative_rows,
    svm_positive_rows,
)


def test_max_overlap_ties_and_no_classes():
    overlaps = np.array([[0.2, 0.7, 0.7], [0.0, 0.0, 0.0], [0.9, 0.1, 0.3]], np.float32)
    iou, cls = max_overlap(overlaps)
    np.testing.assert_array_equal(iou, np.float32([0.7, 0.0, 0.9]))
    np.testing.assert_array_equal(cls, [1, 0, 0])  # ties -> the lower class index
    iou, cls = max_overlap(np.zeros((3, 0), np.float32))
    np.testing.assert_array_equal(iou, [0, 0, 0])
    np.testing.assert_array_equal(cls, [-1, -1, -1])


def test_finetune_selection_boundaries():
    # rows: exact fg threshold, just below it, exact bg lower bound, just below it, a GT (1.0), zero
    overlaps = np.array([[0.5, 0.0], [0.0, 0.4999], [0.1, 0.05], [0.0999, 0.0], [0.2, 1.0], [0.0, 0.0]], np.float32)
    fg, labels, bg = finetune_selection(overlaps, fg_iou=0.5, bg_iou_low=0.1)
    np.testing.assert_array_equal(fg, [0, 4])
    np.testing.assert_array_equal(labels, [1, 2])  # 1 + class index; 0 is background
    np.testing.assert_array_equal(bg, [1, 2])


def test_finetune_selection_matches_loop_reference():
    rng = np.random.default_rng(3)
    overlaps = (rng.random((300, 4)) * rng.integers(0, 2, (300, 4))).astype(np.float32)
    fg, labels, bg = finetune_selection(overlaps, 0.5, 0.1)
    want_fg, want_labels, want_bg = [], [], []
    for i, row in enumerate(overlaps.astype(np.float64)):
        best = max(range(4), key=lambda k: (row[k], -k))
        if row[best] >= 0.5:
            want_fg.append(i)
            want_labels.append(best + 1)
        elif row[best] >= 0.1:
            want_bg.append(i)
    assert fg.tolist() == want_fg and labels.tolist() == want_labels and bg.tolist() == want_bg


def test_svm_rows():
    is_gt = np.array([True, True, True, False, False])
    gt_label = np.array([2, 0, 2, -1, -1], np.int16)
    np.testing.assert_array_equal(svm_positive_rows(is_gt, gt_label, 2), [0, 2])
    np.testing.assert_array_equal(svm_positive_rows(is_gt, gt_label, 1), [])
    # the GT of another class (row 1) is a negative of class 2; IoU exactly 0.3 is not
    column = np.array([1.0, 0.0, 1.0, 0.3, 0.2999], np.float32)
    np.testing.assert_array_equal(svm_negative_rows(column, 0.3), [1, 4])


def test_regression_selection():
    overlaps = np.array([[1.0, 0.0], [0.0, 1.0], [0.55, 0.6], [0.49, 0.0], [0.0, 0.0]], np.float32)
    assigned = np.array([0, 1, 1, 0, -1], np.int32)
    gt_labels = np.array([0, 1], np.int16)
    rows, classes, gt = regression_selection(overlaps, assigned, gt_labels, min_iou=0.5)
    np.testing.assert_array_equal(rows, [0, 1, 2])
    np.testing.assert_array_equal(classes, [0, 1, 1])
    np.testing.assert_array_equal(gt, [0, 1, 1])


def _sets(n_fg, n_bg):
    fg = WindowSet.concat([(0, np.arange(n_fg), np.arange(n_fg) % 3 + 1, np.zeros(n_fg), np.zeros((n_fg, 4)),
                            np.zeros((n_fg, 4)))])
    bg = WindowSet.concat([(0, np.arange(n_bg), np.zeros(n_bg), np.zeros(n_bg), np.zeros((n_bg, 4)), np.zeros((n_bg, 4)))])
    return fg, bg


def test_sampler_fractions_and_determinism():
    fg, bg = _sets(100, 1000)
    sampler = FinetuneSampler(fg, bg, batch_size=128, fg_fraction=0.25, seed=7)
    batch = sampler.batch(5)
    assert len(batch.fg) == 32 and len(batch.bg) == 96
    assert len(set(batch.fg.tolist())) == 32 and len(set(batch.bg.tolist())) == 96  # enough: no repeats
    np.testing.assert_array_equal(batch.labels[:32], fg.label[batch.fg])
    assert (batch.labels[32:] == 0).all() and (batch.labels[:32] > 0).all()
    again = FinetuneSampler(fg, bg, 128, 0.25, seed=7).batch(5)
    np.testing.assert_array_equal(batch.fg, again.fg)
    np.testing.assert_array_equal(batch.bg, again.bg)
    assert not np.array_equal(sampler.batch(6).bg, batch.bg)
    assert not np.array_equal(FinetuneSampler(fg, bg, 128, 0.25, seed=8).batch(5).bg, batch.bg)
    # over many batches every positive is drawn about equally often
    counts = np.bincount(np.concatenate([sampler.batch(i).fg for i in range(200)]), minlength=100)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()


def test_sampler_augmentations():
    fg, bg = _sets(100, 1000)
    plain = FinetuneSampler(fg, bg, 128, 0.25, seed=7)
    flips = FinetuneSampler(fg, bg, 128, 0.25, seed=7, flip=True)
    scales = FinetuneSampler(fg, bg, 128, 0.25, seed=7, random_scales=5)
    # off, they change nothing: the plain sampler's draws, no flips, the chosen scales
    p = plain.batch(3)
    assert not p.flip.any() and (p.scale == -1).all()
    s = scales.batch(3)
    np.testing.assert_array_equal(s.fg, p.fg)
    np.testing.assert_array_equal(s.bg, p.bg)
    # random scales: uniform over 0..4, deterministic per iteration
    drawn = np.concatenate([scales.batch(i).scale for i in range(300)])
    assert set(drawn.tolist()) == set(range(5)) and np.bincount(drawn).min() > 0.8 * len(drawn) / 5
    np.testing.assert_array_equal(scales.batch(9).scale, FinetuneSampler(fg, bg, 128, 0.25, 7, random_scales=5).batch(9).scale)
    # flips: half the population is the flipped copy; indices stay in range, labels follow the window
    batches = [flips.batch(i) for i in range(300)]
    share = np.mean(np.concatenate([b.flip for b in batches]))
    assert 0.45 < share < 0.55
    for b in batches[:20]:
        assert b.fg.max() < 100 and b.bg.max() < 1000 and len(b.flip) == 128
        np.testing.assert_array_equal(b.labels[:32], fg.label[b.fg])
    # a flipped and an unflipped copy of the same window can both be drawn
    pairs = {(int(w), bool(f)) for b in batches for w, f in zip(b.fg, b.flip[:32])}
    assert any((w, True) in pairs and (w, False) in pairs for w, _ in pairs)


def test_sampler_with_too_few_or_no_windows():
    fg, bg = _sets(3, 1000)
    batch = FinetuneSampler(fg, bg, 16, 0.25, seed=0).batch(0)
    assert len(batch.fg) == 4 and set(batch.fg.tolist()) <= {0, 1, 2}  # with replacement
    assert batch_counts(16, 0.25, 0, 50) == (0, 16)
    assert batch_counts(16, 0.25, 5, 0) == (16, 0)
    assert batch_counts(128, 0.25, 5, 5) == (32, 96)
    with pytest.raises(ValueError, match="no fine-tuning windows"):
        batch_counts(16, 0.25, 0, 0)


def test_norm_sample():
    counts = [5, 0, 300, 7, 1000]
    sample = norm_sample(np.random.default_rng(0), counts, max_images=3, per_image=10)
    assert len(sample) <= 3
    assert [i for i, _ in sample] == sorted(i for i, _ in sample)
    for i, rows in sample:
        assert len(rows) == min(counts[i], 10) and rows.max() < counts[i]
        assert np.all(np.diff(rows) > 0)
    again = norm_sample(np.random.default_rng(0), counts, max_images=3, per_image=10)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(sample, again))
    everything = norm_sample(np.random.default_rng(0), counts)
    assert [i for i, _ in everything] == [0, 2, 3, 4]


def _write_item(path, n, k, dim, seed, n_gt=2):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, dim)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f["boxes"] = rng.random((n, 4)).astype(np.float32)
        f["is_gt"] = np.arange(n) < n_gt
        f["gt_label"] = np.where(np.arange(n) < n_gt, 1, -1).astype(np.int16)
        f["scale_index"] = np.zeros(n, np.int8)
        f["cells"] = np.zeros((n, 4), np.int32)
        f["features"] = features
        f["overlaps"] = rng.random((n, k)).astype(np.float32)
        f["assigned_gt"] = np.zeros(n, np.int32)
        f["gt_boxes"] = rng.random((n_gt, 4)).astype(np.float32)
        f["gt_labels"] = np.ones(n_gt, np.int16)
        f["gt_difficult"] = np.zeros(n_gt, bool)
        f.attrs["width"] = 64
        f.attrs["height"] = 48
    return features


def test_read_pool_windows_and_stored_feature_rows(tmp_path):
    features = _write_item(tmp_path / "a.h5", 40, 3, 5, seed=1)
    item = read_pool_windows(tmp_path / "a.h5")
    assert item.image_id == "a" and len(item) == 40 and item.overlaps.shape == (40, 3)
    assert (item.width, item.height) == (64, 48) and item.is_gt.sum() == 2
    assert item.cells.shape == (40, 4) and item.scale_index.dtype == np.int8
    with h5py.File(tmp_path / "a.h5", "r") as f:
        for rows in ([3, 1, 1, 39, 0], [7, 8, 9, 8], [], list(range(40))):
            np.testing.assert_array_equal(read_feature_rows(f["features"], np.array(rows, dtype=np.int64)),
                                          features[rows])
        np.testing.assert_array_equal(read_feature_rows(f["features"]), features)
        assert read_feature_rows(f["features"], np.array([5, 2])).dtype == np.float16
    assert read_pool_windows(tmp_path / "a.h5", "named").image_id == "named"


def test_window_set_take_and_join():
    a = WindowSet.concat([(0, [1, 2], [3, 3], [0, 1], [[0, 0, 1, 1], [1, 1, 2, 2]], [[0, 0, 9, 9], [1, 1, 8, 8]])])
    b = WindowSet.concat([(4, [7], [0], [1], [[2, 2, 3, 3]], [[5, 5, 6, 6]])])
    both = WindowSet.join(a, b)
    assert len(both) == 3 and both.image.tolist() == [0, 0, 4] and both.cells[2].tolist() == [2, 2, 3, 3]
    picked = both.take([2, 0])
    assert picked.row.tolist() == [7, 1] and picked.scale_index.tolist() == [1, 0]
    assert picked.boxes.tolist() == [[5, 5, 6, 6], [0, 0, 9, 9]]
    assert len(WindowSet.concat([])) == 0 and WindowSet.concat([]).cells.shape == (0, 4)


def test_distinct_windows_first_occurrences_in_row_order():
    cells = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])
    scale = np.array([0, 0, 0, 1, 0])
    first, inverse = distinct_windows(scale, cells)
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    for i in range(len(cells)):  # every window is its representative
        assert (cells[first[inverse[i]]] == cells[i]).all() and scale[first[inverse[i]]] == scale[i]
    first, inverse = distinct_windows(np.zeros(0), np.zeros((0, 4)))
    assert first.size == 0 and inverse.size == 0
