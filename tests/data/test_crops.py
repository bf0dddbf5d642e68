"""sppcli.data.crops: object crops, hold-out split and the training / evaluation views."""
from __future__ import annotations

import numpy as np
import torch

from sppcli.data import crops
from sppcli.data.voc import VocDataset


def test_context_box_hand_worked():
    # box 20 x 10 at (10, 20); context 0.3 adds 3 px left/right and 1.5 px top/bottom.
    assert crops.context_box((10, 20, 30, 30), 0.3, 100, 100) == (7, 18, 33, 32)
    assert crops.context_box((10, 20, 30, 30), 0.0, 100, 100) == (10, 20, 30, 30)
    # clipped at the image border
    assert crops.context_box((0, 0, 40, 40), 0.5, 50, 45) == (0, 0, 50, 45)


def test_holdout_split_keeps_images_together_and_is_seeded():
    samples = [crops.Sample("x.jpg", (0, 0, 1, 1), i % 3, f"img{i // 2}") for i in range(40)]
    train, held = crops.holdout_split(samples, 0.25, seed=3)
    assert len(train) + len(held) == 40
    assert {s.group for s in train}.isdisjoint({s.group for s in held})
    assert len({s.group for s in held}) == 5  # round(0.25 * 20 groups)
    assert crops.holdout_split(samples, 0.25, seed=3) == (train, held)
    assert crops.holdout_split(samples, 0.25, seed=4) != (train, held)
    assert crops.holdout_split(samples, 0.0, seed=3) == (samples, [])


def test_views_shapes_and_flips():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    # shorter side 50 -> 64 * 256 / 224 = 73, longer 117
    assert crops.resize_shorter(image, 73).shape == (73, 117, 3)
    # the full view is that same 73-pixel image, uncropped (paper section 3.1.3: min side 256 for 224)
    assert crops.full_view(image, 64).shape == (73, 117, 3)
    assert crops.centre_view(image, 64).shape == (64, 64, 3)
    views = crops.ten_views(image, 64)
    assert views.shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(views[5:], views[:5, :, ::-1])
    np.testing.assert_array_equal(views[4], crops.centre_view(image, 64))
    resized = crops.resize_shorter(image, 73)
    np.testing.assert_array_equal(views[3], resized[-64:, -64:])
    # multi-size: the small view is the big crop resized, so the same draws give the same content
    big = crops.train_view(image, 64, 64, np.random.default_rng(7), 0.2)
    small = crops.train_view(image, 48, 64, np.random.default_rng(7), 0.2)
    assert big.shape == (64, 64, 3) and small.shape == (48, 48, 3)
    np.testing.assert_array_equal(small, crops.resize(big, 48, 48))


def test_train_crops_depend_on_seed_epoch_index_only(tiny_devkit):
    samples = crops.voc_crop_samples(VocDataset(tiny_devkit, "trainval"), 0.3)
    assert samples and all(s.region is not None for s in samples)
    data = crops.TrainCrops(samples, base=48, seed=0, jitter=0.2)
    data.set_epoch(2, 40)
    first = data[3][0]
    assert first.shape == (3, 40, 40) and first.dtype == torch.uint8
    torch.manual_seed(123)
    np.random.seed(5)
    assert torch.equal(data[3][0], first)
    data.set_epoch(3, 40)
    assert not torch.equal(data[3][0], first)
