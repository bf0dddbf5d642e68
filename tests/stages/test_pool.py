"""Stage "pool": window tables (ground truth + proposals on their best scale), and their pooled rows."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sppcli.artifacts import ArtifactStore
from sppcli.detector.windows import read_pool_windows
from sppcli.ops.geometry import window_to_cells
from sppcli.ops.spp_pool import spp_pool_reference
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import features, pool
from tests.conftest import tiny_config
from tests.reference import iou_loop

LEVELS = (1, 2, 3, 6)
# Two scales far enough apart that large windows pick the small one and small windows the large.
SCALES = "features.scales=[128, 360]"
SERIAL = RunOptions(device="cpu", workers=0)


def random_proposals(rng: np.random.Generator, width: int, height: int, count: int) -> np.ndarray:
    """Pixel-aligned windows of every size, plus the whole image, a 1 x 1 window and border hugs."""
    x1 = rng.integers(0, width - 1, count)
    y1 = rng.integers(0, height - 1, count)
    x2 = np.minimum(x1 + rng.integers(1, width, count), width)
    y2 = np.minimum(y1 + rng.integers(1, height, count), height)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    special = np.array([[0, 0, width, height], [5, 7, 6, 8], [0, 0, 12, 9], [width - 20, height - 30, width, height]],
                       dtype=np.float32)
    return np.concatenate([special, boxes])


def make_proposals(planner: Planner, split: str, count: int = 30, seed: int = 0) -> None:
    """A complete proposals artifact with the planner's key; the first image gets no windows."""
    plan = planner.plan("proposals", split)
    out = planner.store.begin(plan.stage, plan.dataset, plan.version, plan.params, plan.upstream_keys,
                              plan.external)
    rng = np.random.default_rng(seed)
    dataset = planner.dataset(split)
    for n, image_id in enumerate(dataset.ids):
        height, width = dataset.load_image(image_id).shape[:2]
        boxes = np.zeros((0, 4), np.float32) if n == 0 else random_proposals(rng, width, height, count)
        with out.write_item(image_id) as f:
            f.create_dataset("boxes", data=boxes)
            f.attrs["width"] = width
            f.attrs["height"] = height
    out.finish(n_items=len(dataset))


def pipeline(cache: Path, config, split="trainval", options=SERIAL):
    planner = Planner(ArtifactStore(cache), config)
    make_proposals(planner, split)
    run_stage(planner, features, planner.plan("features", split), SERIAL)
    manifest, ran = run_stage(planner, pool, planner.plan("pool", split), options)
    return planner, manifest, ran


def read_item(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {**{k: f[k][()] for k in f}, **{f"@{k}": v for k, v in f.attrs.items()}}


def check_item(item: dict, pooled: np.ndarray, gt, proposals: np.ndarray, feature_item, geometry,
               num_classes: int) -> None:
    """Every field of one pool item, and its windows' pooled rows, against hand-made expectations."""
    num_gt = len(gt)
    boxes = item["boxes"]
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, np.concatenate([gt.boxes, proposals]).reshape(-1, 4))
    assert item["is_gt"].tolist() == [True] * num_gt + [False] * len(proposals)
    assert item["gt_label"].dtype == np.int16
    assert item["gt_label"].tolist() == gt.labels.tolist() + [-1] * len(proposals)
    np.testing.assert_array_equal(item["gt_boxes"], gt.boxes)
    assert item["gt_labels"].tolist() == gt.labels.tolist()
    assert item["gt_difficult"].tolist() == gt.difficult.tolist()

    # overlaps and assignment, by a float64 loop
    count = len(boxes)
    assert item["overlaps"].shape == (count, num_classes) and item["overlaps"].dtype == np.float32
    for r in range(count):
        ious = [iou_loop(boxes[r].astype(float), g.astype(float)) for g in gt.boxes]
        for k in range(num_classes):
            best = max([iou for iou, label in zip(ious, gt.labels) if label == k], default=0.0)
            assert item["overlaps"][r, k] == pytest.approx(best, abs=1e-6)
        expected = int(np.argmax(ious)) if ious and max(ious) > 0 else -1
        assert item["assigned_gt"][r] == expected
    if num_gt:
        assert np.allclose(item["overlaps"][np.arange(num_gt), gt.labels], 1.0)

    # scale choice by the paper's rule, cells, and features against the slow pooling loop
    factors = np.asarray(feature_item.scale_factors)
    rows = list(range(min(count, 4))) + list(range(max(0, count - 4), count))
    for r in sorted(set(rows)):
        x1, y1, x2, y2 = boxes[r].astype(float)
        area = max(1.0, (x2 - x1) * (y2 - y1))
        scale = int(np.argmin(np.abs(factors - math.sqrt(224 * 224 / area))))
        assert item["scale_index"][r] == scale
        fmap = torch.from_numpy(feature_item.maps[scale].astype(np.float32))
        cells = window_to_cells(torch.from_numpy(boxes[r:r + 1].astype(np.float64)) * factors[scale], geometry,
                                fmap.shape[1], fmap.shape[2])
        assert item["cells"][r].tolist() == cells[0].tolist()
        expected = spp_pool_reference(fmap, cells, LEVELS)[0].numpy().astype(pooled.dtype)
        np.testing.assert_array_equal(pooled[r], expected)


@pytest.mark.parametrize("dtype,store", [("float16", False), ("float32", False), ("float16", True)])
def test_pool_items_match_references(tiny_devkit, tiny_weights, tmp_path, dtype, store):
    config = tiny_config(tiny_devkit, tiny_weights, SCALES, f"pool.dtype={dtype}", f"pool.store_features={str(store).lower()}")
    planner, manifest, ran = pipeline(tmp_path / "c", config)
    assert ran and manifest.complete
    dataset = planner.dataset("trainval")
    feats = planner.store.manifest("features", manifest.dataset, manifest.upstream["features"])
    props = planner.store.manifest("proposals", manifest.dataset, manifest.upstream["proposals"])
    channels = feats.metrics["net"]["channels"]
    assert manifest.metrics["feature_dim"] == channels * 50
    assert manifest.metrics["levels"] == list(LEVELS) and manifest.metrics["classes"] == list(dataset.classes)
    assert manifest.metrics["pool_seconds_per_image"] > 0 and manifest.metrics["bytes_per_image"] > 0
    assert all(f > 0 for f in manifest.metrics["scale_fractions"])  # both scales are used
    geometry = pool.geometry_of(feats)
    reader = pool.pooled_features_of(manifest, feats)
    assert reader.stored == store and manifest.metrics["store_features"] == store
    total = 0
    for image_id in dataset.ids:
        item = read_item(manifest.item_path(image_id))
        with h5py.File(props.item_path(image_id), "r") as f:
            proposals = f["boxes"][()]
        pooled = reader.window_rows(read_pool_windows(manifest.item_path(image_id)))
        assert ("features" in item) == store
        assert pooled.dtype == np.dtype(dtype) and pooled.shape == (len(item["boxes"]), channels * 50)
        check_item(item, pooled, dataset.ground_truth(image_id), proposals,
                   features.read_feature_item(feats.item_path(image_id)), geometry, len(dataset.classes))
        total += len(item["boxes"])
    assert manifest.metrics["windows"] == total
    first = read_item(manifest.item_path(dataset.ids[0]))  # no proposals: ground truth only
    assert first["is_gt"].all() and len(first["boxes"]) == len(dataset.ground_truth(dataset.ids[0]))

    again, ran = run_stage(planner, pool, planner.plan("pool", "trainval"), SERIAL)
    assert not ran and again.key == manifest.key


def test_image_without_ground_truth_or_proposals(tiny_devkit, tiny_weights, tmp_path):
    config = tiny_config(tiny_devkit, tiny_weights)
    planner = Planner(ArtifactStore(tmp_path / "c"), config)
    feats, _ = run_stage(planner, features, planner.plan("features"), SERIAL)
    image_id = planner.dataset("trainval").ids[0]
    proposals = tmp_path / "empty.h5"
    with h5py.File(proposals, "w") as f:
        f.create_dataset("boxes", data=np.zeros((0, 4), np.float32))
        f.attrs["width"], f.attrs["height"] = 160, 120
    job = pool.PoolJob(image_id=image_id, proposals_path=str(proposals), features_path=str(feats.item_path(image_id)),
                       item_path=str(tmp_path / "item.h5"), gt_boxes=np.zeros((0, 4), np.float32),
                       gt_labels=np.zeros(0, np.int16), gt_difficult=np.zeros(0, bool))
    threads = torch.get_num_threads()
    summary = pool.pool_image(job, levels=LEVELS, dtype="float16", geometry=pool.geometry_of(feats), num_classes=8,
                              store_features=True)
    assert summary["boxes"] == 0 and torch.get_num_threads() == threads
    item = read_item(tmp_path / "item.h5")
    channels = feats.metrics["net"]["channels"]
    assert item["features"].shape == (0, channels * 50) and item["overlaps"].shape == (0, 8)
    assert item["cells"].shape == (0, 4) and item["boxes"].shape == (0, 4) and item["gt_boxes"].shape == (0, 4)
    assert item["assigned_gt"].shape == (0,) and item["scale_index"].dtype == np.int8

    with h5py.File(proposals, "a") as f:
        f.attrs["width"] = 161
    with pytest.raises(ValueError, match="161 x 120"):
        pool.pool_image(job, levels=LEVELS, dtype="float16", geometry=pool.geometry_of(feats), num_classes=8)


def test_window_overlaps_hand_case():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]], dtype=np.float32)
    labels = np.array([0, 1, 0])
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [40, 40, 50, 50], [0, 0, 5, 5]], dtype=np.float32)
    overlaps, assigned = pool.window_overlaps(boxes, gt, labels, 3)
    # [5,0,15,10] vs [0,0,10,10]: inter 50, union 150 -> 1/3; vs [0,0,5,10]: touching edges -> 0.
    # [0,0,5,5] vs [0,0,10,10]: 25/100; vs [0,0,5,10]: 25/50.
    expected = np.array([[1.0, 0, 0], [1 / 3, 0, 0], [0, 0, 0], [0.5, 0, 0]], dtype=np.float32)
    np.testing.assert_allclose(overlaps, expected, atol=1e-7)
    assert assigned.tolist() == [0, 0, -1, 2]


def test_killed_pool_run_resumes_to_the_uninterrupted_result(tiny_devkit, tiny_weights, tmp_path, monkeypatch):
    config = tiny_config(tiny_devkit, tiny_weights, SCALES)
    # the reference pools in two worker processes
    planner, reference, _ = pipeline(tmp_path / "ref", config, options=RunOptions(device="cpu", workers=2))
    ids = list(planner.dataset("trainval").ids)

    done = []
    real = pool.pool_image

    def dying(job, **kwargs):
        if len(done) == 3:
            raise KeyboardInterrupt("killed")
        done.append(job.image_id)
        return real(job, **kwargs)

    monkeypatch.setattr(pool, "pool_image", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline(tmp_path / "run", config)
    monkeypatch.setattr(pool, "pool_image", real)
    store = ArtifactStore(tmp_path / "run")
    run_dir = store.run_dir("pool", reference.dataset, reference.key)
    assert sorted(p.stem for p in (run_dir / "items").glob("*.h5")) == sorted(done)

    seen = []
    monkeypatch.setattr(pool, "pool_image", lambda job, **kw: seen.append(job.image_id) or real(job, **kw))
    planner_run = Planner(store, config)
    resumed, ran = run_stage(planner_run, pool, planner_run.plan("pool", "trainval"), SERIAL)
    assert ran and resumed.key == reference.key and seen == [i for i in ids if i not in done]
    for image_id in ids:
        a, b = read_item(resumed.item_path(image_id)), read_item(reference.item_path(image_id))
        for name in a:
            if name != "@seconds":
                assert np.array_equal(a[name], b[name]), (image_id, name)


def test_elephants(elephants_devkit, tiny_weights, tmp_path):
    config = tiny_config(elephants_devkit, tiny_weights, 'dataset.classes=["elephant"]')
    planner, manifest, _ = pipeline(tmp_path / "c", config)
    dataset = planner.dataset("trainval")
    assert manifest.metrics["classes"] == ["elephant"] and manifest.n_items == len(dataset)
    feats = planner.store.manifest("features", manifest.dataset, manifest.upstream["features"])
    props = planner.store.manifest("proposals", manifest.dataset, manifest.upstream["proposals"])
    reader = pool.pooled_features_of(manifest, feats)
    for image_id in dataset.ids:
        item = read_item(manifest.item_path(image_id))
        pooled = reader.window_rows(read_pool_windows(manifest.item_path(image_id)))
        gt = dataset.ground_truth(image_id)
        assert len(gt) > 0 and (item["@width"], item["@height"]) == (gt.width, gt.height)
        with h5py.File(props.item_path(image_id), "r") as f:
            proposals = f["boxes"][()]
        check_item(item, pooled, gt, proposals, features.read_feature_item(feats.item_path(image_id)),
                   pool.geometry_of(feats), 1)


def test_target_size_picks_the_scale_as_the_release_does():
    # Scales 480 and 874 of a 500 x 375 image (factors 1.28 and 2.331). A 120 x 120 window wants
    # factor 224/120 = 1.867 with the paper's 224: 0.464 from 2.331, 0.587 from 1.28, so 874;
    # and 208/120 = 1.733 with the release's 208: 0.453 from 1.28, 0.597 from 2.331, so 480.
    from sppcli.ops.geometry import FieldGeometry
    from sppcli.stages.features import FeatureItem

    item = FeatureItem(width=500, height=375, scales=(480, 874), scale_factors=(480 / 375, 874 / 375),
                       scaled_sizes=np.array([[640, 480], [1165, 874]]), map_shapes=((8, 30, 40), (8, 54, 72)),
                       maps=())
    geometry = FieldGeometry(stride=16, offset0=8.5, offset=8.0)
    box = np.array([[100, 100, 220, 220]], np.float32)
    paper, _ = pool.assign_windows(box, item, geometry, target_size=224)
    release, cells = pool.assign_windows(box, item, geometry, target_size=208)
    assert paper.tolist() == [1] and release.tolist() == [0]
    assert (cells[0, 2:] < [40, 30]).all()  # cells lie on the 480 map
