"""Caltech101's random-splits protocol: per-class counts, disjointness, seeding, mean class accuracy."""
import numpy as np
import pytest

from sppcli.data.caltech_protocol import mean_class_accuracy, random_splits


def test_splits_take_n_train_and_up_to_n_test_per_class_disjointly():
    labels = np.repeat([0, 1, 2], [40, 100, 33])
    splits = random_splits(labels, train_per_class=30, test_per_class=50, splits=4, seed=7)
    assert len(splits) == 4
    for split in splits:
        assert not set(split.train) & set(split.test)
        assert np.bincount(labels[split.train]).tolist() == [30, 30, 30]
        assert np.bincount(labels[split.test]).tolist() == [10, 50, 3]  # the rest, at most 50
    assert not np.array_equal(splits[0].train, splits[1].train)


def test_splits_depend_on_seed_and_index_only():
    labels = np.repeat(np.arange(5), 45)
    a = random_splits(labels, 30, 50, splits=3, seed=1)
    b = random_splits(labels, 30, 50, splits=5, seed=1)
    for x, y in zip(a, b):  # more splits keep the first ones
        assert np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test)
    c = random_splits(labels, 30, 50, splits=3, seed=2)
    assert not np.array_equal(a[0].train, c[0].train)


def test_a_class_with_nothing_left_to_test_is_an_error():
    with pytest.raises(ValueError, match="30 images or fewer"):
        random_splits(np.repeat([0, 1], [31, 30]), 30, 50, splits=1, seed=0)


def test_mean_class_accuracy_weighs_classes_equally():
    truth = np.array([0] * 8 + [1] * 2)
    predicted = np.array([0] * 8 + [0, 1])  # class 0: 8/8, class 1: 1/2
    assert mean_class_accuracy(predicted, truth) == pytest.approx((1.0 + 0.5) / 2)
    assert np.mean(predicted == truth) == pytest.approx(0.9)  # what a plain accuracy would say
