"""Synthetic VOC-format dataset: determinism, layout, consistency with the VOC reader, statistics."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from sppcli.data import synth
from sppcli.data.synth import CLASS_NAMES, DIFFICULT_MIN_SIDE, make_dataset, render_image
from sppcli.data.voc import VocDataset, class_presence

N_TRAINVAL, N_TEST, SIZE = 16, 8, (192, 144)
SPLITS = ("trainval", "train", "val", "test")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> tuple[Path, dict, list]:
    out = tmp_path_factory.mktemp("synth") / "VOC2007"
    calls = []
    summary = make_dataset(out, seed=3, n_trainval=N_TRAINVAL, n_test=N_TEST, size=SIZE,
                           progress=lambda i, n: calls.append((i, n)))
    return out, summary, calls


@pytest.fixture(scope="module")
def datasets(devkit) -> dict[str, VocDataset]:
    return {split: VocDataset(devkit[0], split) for split in SPLITS}


def test_same_seed_same_bytes_other_seed_differs(devkit, tmp_path):
    first = _digests(devkit[0])
    make_dataset(tmp_path / "again", seed=3, n_trainval=N_TRAINVAL, n_test=N_TEST, size=SIZE)
    assert _digests(tmp_path / "again") == first
    make_dataset(tmp_path / "other", seed=4, n_trainval=4, n_test=2, size=SIZE)
    other = _digests(tmp_path / "other")
    assert other["JPEGImages/000001.jpg"] != first["JPEGImages/000001.jpg"]


def test_images_do_not_depend_on_generation_order():
    later_first = render_image(3, 5, SIZE, "ring")
    render_image(3, 4, SIZE, "disc")
    again = render_image(3, 5, SIZE, "ring")
    np.testing.assert_array_equal(later_first[0], again[0])
    assert later_first[1] == again[1]
    assert later_first[1][0].name == "ring"


def test_layout_and_counts(devkit, datasets):
    out, summary, calls = devkit
    total = N_TRAINVAL + N_TEST
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == total
    assert len(list((out / "Annotations").glob("*.xml"))) == total
    assert (out / "classes.txt").read_text().split() == list(CLASS_NAMES)
    assert calls == [(i, total) for i in range(1, total + 1)]
    ids = {split: datasets[split].ids for split in SPLITS}
    assert len(ids["trainval"]) == N_TRAINVAL and len(ids["test"]) == N_TEST
    assert sorted(ids["train"] + ids["val"]) == sorted(ids["trainval"])
    assert not set(ids["train"]) & set(ids["val"]) and not set(ids["trainval"]) & set(ids["test"])
    assert summary["images"] == {split: len(ids[split]) for split in SPLITS}
    for split in ("trainval", "test"):
        counted = {c: 0 for c in CLASS_NAMES}
        for image_id in ids[split]:
            for obj in datasets[split].annotation(image_id).objects:
                counted[obj.name] += 1
        assert summary["objects"][split] == counted
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_class_image_sets_agree_with_annotations(devkit, datasets):
    out = devkit[0]
    for split, ds in datasets.items():
        for class_name in CLASS_NAMES:
            lines = (out / "ImageSets" / "Main" / f"{class_name}_{split}.txt").read_text().splitlines()
            rows = [line.split() for line in lines]
            assert [r[0] for r in rows] == list(ds.ids)
            assert [int(r[1]) for r in rows] == [class_presence(ds.annotation(i), class_name)
                                                 for i in ds.ids]


def test_every_class_appears_clearly_in_every_split(datasets):
    for split, ds in datasets.items():
        present = {CLASS_NAMES[label] for i in ds.ids
                   for label, hard in zip(ds.ground_truth(i).labels, ds.ground_truth(i).difficult)
                   if not hard}
        assert present == set(CLASS_NAMES), split


def test_reads_back_cleanly_through_voc_reader(datasets, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ds in datasets.values():
            assert ds.classes == CLASS_NAMES
            for image_id in ds.ids:
                gt = ds.ground_truth(image_id)
                assert len(gt) >= 1 and (gt.width, gt.height) == SIZE
                assert ds.load_image(image_id).shape == (SIZE[1], SIZE[0], 3)
    assert [r.getMessage() for r in caplog.records if r.name == "sppcli.data"] == []  # no clipped boxes, no unknown names


def test_object_statistics(datasets):
    boxes, difficult, truncated, counts = [], [], [], []
    for split in ("trainval", "test"):
        ds = datasets[split]
        for image_id in ds.ids:
            gt = ds.ground_truth(image_id)
            boxes.append(gt.boxes), difficult.append(gt.difficult), truncated.append(gt.truncated)
            counts.append(len(gt))
    boxes, difficult, truncated = np.concatenate(boxes), np.concatenate(difficult), np.concatenate(truncated)
    sides = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    areas = sides.prod(axis=1)
    assert areas.max() / areas.min() >= 8
    assert areas[~difficult].max() / areas[~difficult].min() >= 8
    aspect = sides[~difficult, 0] / sides[~difficult, 1]
    assert aspect.min() < 0.67 and aspect.max() > 1.5
    assert difficult.any() and truncated.any() and not difficult.all()
    np.testing.assert_array_equal(difficult, sides.min(axis=1) < DIFFICULT_MIN_SIDE)
    width, height = SIZE
    on_border = (boxes[:, 0] == 0) | (boxes[:, 1] == 0) | (boxes[:, 2] == width) | (boxes[:, 3] == height)
    assert on_border[truncated].all()  # a truncated object's box reaches the border it crosses
    assert max(counts) >= 3 and min(counts) >= 1


def _sample_centres_inside(polygon: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Slow reference: crossing-number test of every sample centre against every edge, float64."""
    inside = np.zeros((rows, cols), dtype=bool)
    n = len(polygon)
    for r in range(rows):
        y = r + 0.5
        for c in range(cols):
            x = c + 0.5
            crossings = 0
            for k in range(n):
                (x0, y0), (x1, y1) = polygon[k], polygon[(k + 1) % n]
                if min(y0, y1) <= y < max(y0, y1):
                    if x >= x0 + (y - y0) / (y1 - y0) * (x1 - x0):
                        crossings += 1
            inside[r, c] = crossings % 2 == 1
    return inside


def test_polygon_fill_matches_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(3):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radii = rng.uniform(4, 14, 9)
        polygon = np.stack([15 + radii * np.cos(angles), 14 + radii * np.sin(angles)], axis=1)
        polygon[2] = (3.5, 14.5)  # a vertex exactly on a sample centre's row and column
        np.testing.assert_array_equal(synth._fill_polygon(polygon, 28, 31),
                                      _sample_centres_inside(polygon, 28, 31))


def test_masks_and_tight_boxes_are_exact():
    square = [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64), True)]
    geometry = synth._Geometry(50.0, 40.0, 10.0, 5.0, 0.0)  # covers [40, 60) x [35, 45)
    alpha = synth._downsample(synth._supersampled_mask(square, geometry).astype(np.float32), 4)
    x0, y0, _, _ = geometry.patch()
    assert alpha.sum() == 200 and set(np.unique(alpha)) == {0.0, 1.0}
    assert synth._tight_box(alpha, x0, y0) == (40, 35, 60, 45)

    ring = [(synth._circle(1.0, points=720), True), (synth._circle(0.5, points=720), False)]
    ellipse = synth._Geometry(50.3, 40.6, 20.0, 12.0, 0.7)
    alpha = synth._downsample(synth._supersampled_mask(ring, ellipse).astype(np.float32), 4)
    assert alpha.sum() == pytest.approx(np.pi * 20 * 12 * 0.75, rel=0.01)
    # the rotated ellipse's analytic extent: half-widths sqrt(a^2 cos^2 + b^2 sin^2), ...
    c, s = np.cos(0.7), np.sin(0.7)
    half_x, half_y = np.hypot(20 * c, 12 * s), np.hypot(20 * s, 12 * c)
    x0, y0, _, _ = ellipse.patch()
    box = synth._tight_box(alpha, x0, y0)
    expected = (50.3 - half_x, 40.6 - half_y, 50.3 + half_x, 40.6 + half_y)
    assert np.abs(np.subtract(box, expected)).max() <= 1.0


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        make_dataset(tmp_path / "a", seed=-1)
    with pytest.raises(ValueError, match="trainval"):
        make_dataset(tmp_path / "b", n_test=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
