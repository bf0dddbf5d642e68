"""Caltech101's evaluation protocol for a folder-per-class image set (paper section 3.3, Table 4).

Per split: a seeded random ``train_per_class`` images of every class for training and up to
``test_per_class`` of the *other* images of that class for testing; the score of a split is the
mean over classes of the per-class accuracy (Caltech101's "mean recognition rate", which does not
let its 800-image classes outweigh its 31-image ones); the protocol repeats ``splits`` random
splits and reports their mean and standard deviation.

A class with no more than ``train_per_class`` images cannot be tested: it is an error rather than a
class quietly left out, since it would change what the mean means.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices into the image list: ``train`` and ``test`` are disjoint and sorted."""

    train: np.ndarray
    test: np.ndarray


def random_splits(labels: Sequence[int], train_per_class: int, test_per_class: int, splits: int,
                  seed: int) -> list[Split]:
    """``splits`` random train/test splits of images labelled ``labels`` (class indices).

    Split ``i`` depends only on ``(seed, i)`` and the labels, so adding splits keeps the first ones.

    Raises:
        ValueError: a class has ``train_per_class`` images or fewer (nothing left to test), or
            the counts are not positive.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if train_per_class < 1 or test_per_class < 1 or splits < 1:
        raise ValueError(f"need train_per_class, test_per_class and splits >= 1, got "
                         f"{train_per_class}, {test_per_class}, {splits}")
    classes = np.unique(labels)
    members = {int(k): np.flatnonzero(labels == k) for k in classes}
    short = [k for k, idx in members.items() if len(idx) <= train_per_class]
    if short:
        raise ValueError(f"{len(short)} class(es) have {train_per_class} images or fewer (class indices "
                         f"{short[:10]}): nothing is left to test; lower classify.train_per_class")
    out = []
    for i in range(splits):
        rng = np.random.default_rng([int(seed), i])
        train, test = [], []
        for k in sorted(members):
            order = rng.permutation(members[k])
            train.append(order[:train_per_class])
            test.append(order[train_per_class:train_per_class + test_per_class])
        out.append(Split(np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return out


def mean_class_accuracy(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """Mean over the classes present in ``truth`` of the fraction of their images predicted right."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if len(truth) == 0:
        raise ValueError("no test images")
    return float(np.mean([np.mean(predicted[truth == k] == k) for k in np.unique(truth)]))
