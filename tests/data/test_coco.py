"""COCO-format datasets: the reader, the VOC -> COCO converter, COCO metrics and the config's
mapping of splits to JSON files."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sppcli.artifacts import ArtifactStore
from sppcli.config import load_config
from sppcli.data.coco import CocoDataset, CocoError, voc_to_coco
from sppcli.data.coco_eval import evaluate_coco
from sppcli.data.voc import VocDataset
from sppcli.data.voc_eval import evaluate
from sppcli.pipeline import Planner


def _write_coco(tmp_path: Path, voc: VocDataset, name: str) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(voc_to_coco(voc)))
    return path


def _gt(ds) -> dict:
    out = {}
    for image_id in ds.ids:
        g = ds.ground_truth(image_id)
        out[image_id] = (g.boxes, g.labels, g.difficult)
    return out


def _noisy_detections(voc: VocDataset, seed: int = 0) -> dict:
    """Per class (VOC ids, scores, boxes): jittered hits, duplicates and false positives."""
    rng = np.random.default_rng(seed)
    dets = {name: ([], [], []) for name in voc.classes}
    for image_id in voc.ids:
        g = voc.ground_truth(image_id)
        for box, label in zip(g.boxes.astype(np.float64), g.labels):
            ids, scores, boxes = dets[voc.classes[label]]
            w, h = box[2] - box[0], box[3] - box[1]
            for _ in range(int(rng.integers(0, 3))):  # 0: a miss, 2: a duplicate
                ids.append(image_id)
                scores.append(float(rng.normal()))
                boxes.append(box + rng.normal(0, 0.15, 4) * [w, h, w, h])
        for _ in range(3):
            name = voc.classes[int(rng.integers(len(voc.classes)))]
            x, y = rng.uniform(0, [g.width - 20, g.height - 20])
            dets[name][0].append(image_id)
            dets[name][1].append(float(rng.normal(-0.5)))
            dets[name][2].append([x, y, x + rng.uniform(8, 40), y + rng.uniform(8, 40)])
    return {k: (ids, np.array(s), np.array(b).reshape(-1, 4)) for k, (ids, s, b) in dets.items()}


def _renamed(dets: dict, mapping: dict) -> dict:
    return {k: ([mapping[i] for i in ids], s, b) for k, (ids, s, b) in dets.items()}


# --------------------------------------------------------------------------------------------- round trip


def test_voc_converted_to_coco_reads_back_with_identical_ground_truth(tmp_path, tiny_devkit):
    voc = VocDataset(tiny_devkit, "trainval")
    coco = CocoDataset(_write_coco(tmp_path, voc, "instances_trainval.json"), tiny_devkit / "JPEGImages",
                       "trainval")
    assert coco.classes == voc.classes and len(coco) == len(voc) and coco.split == "trainval"
    assert coco.ids == tuple(str(i) for i in range(1, len(voc) + 1))
    n_difficult = n_truncated = 0
    for voc_id, coco_id in zip(voc.ids, coco.ids):
        a, b = voc.ground_truth(voc_id), coco.ground_truth(coco_id)
        assert (a.width, a.height) == (b.width, b.height)
        for field in ("boxes", "labels", "difficult", "truncated"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (voc_id, field)
        n_difficult += int(b.difficult.sum())
        n_truncated += int(b.truncated.sum())
        assert coco.image_path(coco_id) == voc.image_path(voc_id)
    # the synthetic set has both kinds, so the flags really made the trip
    assert n_difficult > 0 and n_truncated > 0
    assert np.array_equal(coco.load_image(coco.ids[0]), voc.load_image(voc.ids[0]))
    files = coco.external_files()
    assert files[0].name == "instances_trainval.json" and len(files) == 1 + len(voc)
    assert all(p.is_relative_to(coco.devkit) for p in files)


def test_fixed_detections_get_the_same_voc07_ap_through_both_readers(tmp_path, tiny_devkit):
    voc = VocDataset(tiny_devkit, "trainval")
    coco = CocoDataset(_write_coco(tmp_path, voc, "instances.json"), tiny_devkit / "JPEGImages")
    dets = _noisy_detections(voc)
    a = evaluate(_gt(voc), dets, voc.classes)
    b = evaluate(_gt(coco), _renamed(dets, dict(zip(voc.ids, coco.ids))), coco.classes)
    assert a.ap == b.ap and a.mAP == b.mAP
    assert 0.2 < a.mAP < 0.95  # misses, duplicates and false positives: a non-trivial curve


def test_in_memory_coco_evaluation_equals_pycocotools_on_the_written_file(tmp_path, tiny_devkit):
    """The ground truth coco_eval builds from a dataset gives COCOeval's numbers for the JSON
    file voc_to_coco writes, loaded and scored the way pycocotools' own examples do."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    voc = VocDataset(tiny_devkit, "trainval")
    path = _write_coco(tmp_path, voc, "instances.json")
    dets = _noisy_detections(voc, seed=1)
    ours = evaluate_coco(_gt(voc), dets, voc.classes)
    number = {image_id: n for n, image_id in enumerate(voc.ids, 1)}
    results = [{"image_id": number[i], "category_id": k + 1, "score": float(s),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for k, name in enumerate(voc.classes) for i, s, b in zip(*dets[name])]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert ours.stats == pytest.approx(list(evaluator.stats), abs=1e-12)
    assert 0 < ours.mAP < ours.AP50 < 1


# --------------------------------------------------------------------------------------------- COCO AP


def _perfect(ds) -> dict:
    dets = {name: ([], [], []) for name in ds.classes}
    for image_id in ds.ids:
        g = ds.ground_truth(image_id)
        for box, label, difficult in zip(g.boxes, g.labels, g.difficult):
            if not difficult:
                ids, scores, boxes = dets[ds.classes[label]]
                ids.append(image_id)
                scores.append(1.0)
                boxes.append(box)
    return {k: (ids, np.array(s), np.array(b).reshape(-1, 4)) for k, (ids, s, b) in dets.items()}


def test_coco_ap_of_perfect_detections_is_one_and_of_shifted_boxes_lower(tiny_devkit):
    voc = VocDataset(tiny_devkit, "trainval")
    perfect = _perfect(voc)
    best = evaluate_coco(_gt(voc), perfect, voc.classes)
    assert best.mAP == pytest.approx(1.0) and best.AP50 == pytest.approx(1.0) and best.AP75 == pytest.approx(1.0)
    present = [k for k, n in best.n_positives.items() if n > 0]
    assert present and all(best.ap[k] == pytest.approx(1.0) for k in present)
    assert all(math.isnan(best.ap[k]) for k in voc.classes if k not in present)

    def shifted(fraction):
        out = {}
        for k, (ids, s, b) in perfect.items():
            b = b.astype(np.float64).copy()
            b[:, [0, 2]] += fraction * (b[:, 2:3] - b[:, 0:1])
            out[k] = (ids, s, b)
        return evaluate_coco(_gt(voc), out, voc.classes)

    slightly, badly = shifted(0.1), shifted(0.4)
    # IoU of a box shifted by 10% of its width is 0.82: every match at .5-.8, none above
    assert slightly.AP50 == pytest.approx(1.0) and 0.5 < slightly.mAP < 0.8
    assert badly.AP50 < 0.5 and badly.mAP < slightly.mAP


def _one_image_coco(tmp_path: Path, crowd: int) -> CocoDataset:
    Image.new("RGB", (100, 80), (90, 120, 30)).save(tmp_path / "a.png")
    doc = {"images": [{"id": 42, "file_name": "a.png", "width": 100, "height": 80}],
           "categories": [{"id": 1, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 42, "category_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 0},
                           {"id": 2, "image_id": 42, "category_id": 1, "bbox": [50, 20, 40, 50], "iscrowd": crowd}]}
    path = tmp_path / f"crowd{crowd}.json"
    path.write_text(json.dumps(doc))
    return CocoDataset(path)


def test_iscrowd_objects_are_ignored(tmp_path):
    crowd, plain = _one_image_coco(tmp_path, 1), _one_image_coco(tmp_path, 0)
    assert crowd.ground_truth("42").difficult.tolist() == [False, True]
    assert plain.ground_truth("42").difficult.tolist() == [False, False]
    hit = {"cat": (["42"], np.array([0.8]), np.array([[10, 10, 40, 40]]))}
    # the crowd is no positive: one hit is full recall; as a plain object it is a miss
    assert evaluate_coco(_gt(crowd), hit, crowd.classes).mAP == pytest.approx(1.0)
    assert evaluate_coco(_gt(plain), hit, plain.classes).mAP < 0.6
    assert evaluate(_gt(crowd), hit, crowd.classes).mAP == pytest.approx(1.0)
    assert evaluate(_gt(plain), hit, plain.classes).mAP < 0.6
    # a detection on part of the crowd, ranked first, is not a false positive either
    inside = {"cat": (["42", "42"], np.array([0.9, 0.8]), np.array([[55, 25, 75, 45], [10, 10, 40, 40]]))}
    assert evaluate_coco(_gt(crowd), inside, crowd.classes).mAP == pytest.approx(1.0)
    assert evaluate_coco(_gt(plain), inside, plain.classes).mAP < 0.6


# --------------------------------------------------------------------------------------------- reading


def _tiny_coco(tmp_path: Path, categories, annotations, name="instances.json") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48)).save(tmp_path / "x.jpg")
    doc = {"images": [{"id": 7, "file_name": "x.jpg", "width": 64, "height": 48}],
           "categories": categories, "annotations": annotations}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_classes_follow_category_ids_and_a_subset_drops_other_objects(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 9, "bbox": [1, 2, 10, 10]},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [20, 5, 10.5, 20]}]
    path = _tiny_coco(tmp_path, [{"id": 9, "name": "zebra"}, {"id": 3, "name": "apple"}], anns)
    ds = CocoDataset(path)
    assert ds.classes == ("apple", "zebra")  # by category id, not file order
    g = ds.ground_truth("7")
    assert g.labels.tolist() == [1, 0]
    assert g.boxes.tolist() == [[1, 2, 11, 12], [20, 5, 30.5, 25]]  # [x, y, w, h] -> (x, y, x+w, y+h)
    only = CocoDataset(path, classes=["zebra"])
    assert only.classes == ("zebra",) and only.ground_truth("7").labels.tolist() == [0]
    assert [o.name for o in only.annotation("7").objects] == ["zebra", "apple"]
    with pytest.raises(CocoError, match="giraffe"):
        CocoDataset(path, classes=["giraffe"])


def test_name_is_folder_safe_and_two_different_files_never_share_it(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    one = CocoDataset(_tiny_coco(tmp_path / "one", cats, [], "instances train.json"))
    two = CocoDataset(_tiny_coco(tmp_path / "two", cats + [{"id": 2, "name": "b"}], [], "instances train.json"))
    same = CocoDataset(_tiny_coco(tmp_path / "three", cats, [], "instances train.json"))
    assert one.name != two.name and one.name == same.name
    assert one.name.startswith("instances_train_") and all(c.isalnum() or c in "._-" for c in one.name)


def test_boxes_outside_the_image_are_clipped_or_dropped_with_one_line_per_kind(tmp_path, caplog):
    anns = [{"id": i, "image_id": 7, "category_id": 1, "bbox": b}
            for i, b in enumerate([[-5, 0, 20, 10], [50, 40, 30, 30], [70, 0, 5, 5], [80, 10, 5, 5],
                                   [10, 10, 5, 5]], 1)]
    with caplog.at_level(logging.WARNING, logger="sppcli.data.coco"):
        ds = CocoDataset(_tiny_coco(tmp_path, [{"id": 1, "name": "a"}], anns))
    assert ds.ground_truth("7").boxes.tolist() == [[0, 0, 15, 10], [50, 40, 64, 48], [10, 10, 15, 15]]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "4 box(es) partly outside" in messages[0] and "annotation ids 1, 2, 3 and 1 more" in messages[0]
    assert "2 box(es) without area" in messages[1]


def test_unusable_files_are_named_in_one_clear_error(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    with pytest.raises(CocoError, match="annotation 5 has category_id 2"):
        CocoDataset(_tiny_coco(tmp_path, cats, [{"id": 5, "image_id": 7, "category_id": 2, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(CocoError, match="no usable bbox"):
        CocoDataset(_tiny_coco(tmp_path, cats, [{"id": 5, "image_id": 7, "category_id": 1}]))
    ds = CocoDataset(_tiny_coco(tmp_path, cats, []), images_dir=tmp_path / "elsewhere")
    with pytest.raises(CocoError, match="elsewhere/x.jpg: image file not found"):
        ds.external_files()
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CocoError, match="not a COCO instances file"):
        CocoDataset(tmp_path / "list.json")


# --------------------------------------------------------------------------------------------- config


def test_config_maps_the_train_and_test_splits_to_their_json_files(tmp_path, tiny_devkit, caplog):
    train = _write_coco(tmp_path, VocDataset(tiny_devkit, "trainval"), "instances_train.json")
    test = _write_coco(tmp_path, VocDataset(tiny_devkit, "test"), "instances_test.json")
    images = str(tiny_devkit / "JPEGImages")
    store = ArtifactStore(tmp_path / "cache")
    planner = Planner(store, load_config(None, [f"dataset.devkit={str(train)!r}", f"dataset.images={images!r}",
                                                f"dataset.test_devkit={str(test)!r}"]))
    a, b = planner.dataset("trainval"), planner.dataset("test")
    assert (a.json_path, b.json_path) == (train, test) and (a.split, b.split) == ("trainval", "test")
    assert b.images_dir == Path(images)  # test_images defaults to images
    assert len(a) == 8 and len(b) == 6 and a.name != b.name
    assert planner.plan("evaluate").dataset == b.name and planner.plan("proposals").dataset == a.name
    digest = planner.dataset_digest("test")
    with pytest.raises(CocoError, match="'val'"):
        planner.dataset("val")

    # images are part of the digest: other pixels, other keys
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in Path(images).iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (160, 120)).save(copy / Path(b.image_path(b.ids[0])).name)
    other = Planner(store, planner.config.replace("dataset", test_images=str(copy)))
    assert other.dataset_digest("test") != digest and other.dataset_digest("trainval") == planner.dataset_digest("trainval")

    # no test file: the test split is the training file, and the user is told
    with caplog.at_level(logging.WARNING, logger="sppcli.pipeline"):
        alone = Planner(store, planner.config.replace("dataset", test_devkit=""))
        assert alone.dataset("test").json_path == train
    assert "dataset.test_devkit is not set" in caplog.text


def test_the_coco_keys_of_the_config_change_no_voc_key(tmp_path, tiny_devkit, tiny_weights):
    from tests.conftest import tiny_config

    store = ArtifactStore(tmp_path / "cache")
    plain = Planner(store, tiny_config(tiny_devkit, tiny_weights))
    other = Planner(store, tiny_config(tiny_devkit, tiny_weights, "dataset.images='x'", "dataset.test_devkit='y'",
                                       "dataset.test_images='z'"))
    for stage, split in [("proposals", "trainval"), ("pool", "test"), ("svm", None), ("evaluate", None)]:
        assert plain.plan(stage, split).key == other.plan(stage, split).key
    assert plain.plan("evaluate").key != Planner(store, tiny_config(tiny_devkit, tiny_weights, "evaluate.metric='coco'")).plan("evaluate").key
