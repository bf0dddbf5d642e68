"""Importing users' own proposal boxes (NPZ, HDF5, R-CNN .mat) and the stage's metrics on them."""
import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from sppcli.artifacts import ArtifactStore
from sppcli.config import load_config
from sppcli.data.proposal_files import ProposalImportError, parse_convention
from sppcli.data.proposal_recall import format_recall_table
from sppcli.data.voc import VocAnnotation, VocDataset, VocObject, write_annotation, write_image_set
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import STAGES, proposals
from sppcli.stages.proposals import import_proposals, read_proposal_item

# A hand-made devkit: two 40 x 30 images, internal (0-based continuous) boxes.
GT = {
    "a": [("cat", (0, 0, 10, 10), False), ("dog", (20, 10, 40, 30), False), ("cat", (30, 0, 34, 4), True)],
    "b": [("cat", (10, 10, 30, 20), False)],
}
# Proposals in internal xyxy. In "a": an exact cat (IoU 1), a duplicate of it, half of the dog
# (IoU 200 / 400 = 0.5), and a box partly outside the image (clipped to (35, 25, 40, 30)).
# In "b": 12 of the cat's 20 columns (IoU 120 / 200 = 0.6).
BOXES = {
    "a": np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 10, 30, 30], [35, 25, 50, 40]], dtype=np.float64),
    "b": np.array([[10, 10, 22, 20]], dtype=np.float64),
}
CLEANED = {"a": BOXES["a"][[0, 2, 3]].copy(), "b": BOXES["b"]}
CLEANED["a"][2] = [35, 25, 40, 30]


@pytest.fixture(scope="module")
def hand_devkit(tmp_path_factory):
    devkit = tmp_path_factory.mktemp("hand") / "VOC2007"
    (devkit / "JPEGImages").mkdir(parents=True)
    (devkit / "classes.txt").write_text("cat\ndog\n")
    for image_id, objects in GT.items():
        Image.new("RGB", (40, 30), (90, 120, 150)).save(devkit / "JPEGImages" / f"{image_id}.jpg")
        annotation = VocAnnotation(image_id, 40, 30, tuple(VocObject(n, tuple(map(float, b)), d) for n, b, d in objects))
        write_annotation(devkit / "Annotations" / f"{image_id}.xml", annotation, f"{image_id}.jpg")
    write_image_set(devkit, "test", list(GT))
    return devkit


def _begin(cache):
    return ArtifactStore(cache).begin("proposals", "hand_test", STAGES["proposals"].version, {}, {}, {})


def _items(run, ids=GT):
    return {i: read_proposal_item(run.item_path(i)) for i in ids}


def _check_cleaned(run):
    for image_id, (boxes, attrs) in _items(run).items():
        assert boxes.dtype == np.float32
        np.testing.assert_array_equal(boxes, CLEANED[image_id])
        assert (attrs["width"], attrs["height"]) == (40, 30)


def test_npz_one_array_per_id(hand_devkit, tmp_path):
    source = tmp_path / "boxes.npz"
    np.savez(source, **BOXES, c=np.zeros((3, 4)))  # "c" is not in the split
    run = _begin(tmp_path / "cache")
    summary = import_proposals(source, VocDataset(hand_devkit, "test"), run)
    _check_cleaned(run)
    assert summary["extra_ids"] == 1 and summary["format"] == "npz"
    assert summary["boxes_read"] == 5 and summary["boxes_dropped"] == 1  # the duplicate


def test_npz_ids_layout_in_one_based_yxyx(hand_devkit, tmp_path):
    source = tmp_path / "boxes.npz"
    # internal (x1, y1, x2, y2) -> VOC 1-based inclusive (y1 + 1, x1 + 1, y2, x2)
    yxyx1 = {f"boxes_{i}": b[:, [1, 0, 3, 2]] + [1, 1, 0, 0] for i, b in BOXES.items()}
    np.savez(source, ids=np.array(list(BOXES)), **yxyx1)
    run = _begin(tmp_path / "cache")
    import_proposals(source, VocDataset(hand_devkit, "test"), run, one_based_inclusive=True, order="yxyx")
    _check_cleaned(run)


def test_h5_one_dataset_per_id(hand_devkit, tmp_path):
    source = tmp_path / "boxes.h5"
    with h5py.File(source, "w") as f:
        for image_id, b in BOXES.items():
            f[image_id] = b.astype(np.float32)
    run = _begin(tmp_path / "cache")
    import_proposals(source, VocDataset(hand_devkit, "test"), run)
    _check_cleaned(run)


def _rcnn_cells(boxes):
    """R-CNN's release layout: 1-based inclusive [y1 x1 y2 x2] per image."""
    return {i: b[:, [1, 0, 3, 2]] + [1, 1, 0, 0] for i, b in boxes.items()}


def test_rcnn_mat_v5(hand_devkit, tmp_path):
    source = tmp_path / "voc_2007_test.mat"
    cells = _rcnn_cells(BOXES)
    images = np.empty((1, 2), dtype=object)
    boxes = np.empty((1, 2), dtype=object)
    for k, image_id in enumerate(["b", "a"]):  # file order need not be the split's order
        images[0, k] = image_id
        boxes[0, k] = cells[image_id]
    scipy.io.savemat(source, {"images": images, "boxes": boxes})
    run = _begin(tmp_path / "cache")
    summary = import_proposals(source, VocDataset(hand_devkit, "test"), run)
    assert summary["one_based_inclusive"] and summary["order"] == "yxyx"
    _check_cleaned(run)


def test_rcnn_mat_v73(hand_devkit, tmp_path):
    """MATLAB v7.3: an HDF5 file; cells are references to column-major (transposed) data."""
    source = tmp_path / "voc_2007_test_v73.mat"
    cells = _rcnn_cells(BOXES)
    with h5py.File(source, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        image_refs, box_refs = [], []
        for k, image_id in enumerate(GT):
            name = refs.create_dataset(f"n{k}", data=np.array([[ord(c)] for c in image_id], dtype=np.uint16))
            name.attrs["MATLAB_class"] = np.bytes_("char")
            data = refs.create_dataset(f"b{k}", data=cells[image_id].T)
            data.attrs["MATLAB_class"] = np.bytes_("double")
            image_refs.append(name.ref)
            box_refs.append(data.ref)
        f.create_dataset("images", data=np.array([image_refs]), dtype=h5py.ref_dtype)
        f.create_dataset("boxes", data=np.array([box_refs]), dtype=h5py.ref_dtype)
    run = _begin(tmp_path / "cache")
    import_proposals(source, VocDataset(hand_devkit, "test"), run)
    _check_cleaned(run)


def test_missing_ids_are_listed(hand_devkit, tmp_path):
    source = tmp_path / "boxes.npz"
    np.savez(source, a=BOXES["a"], z=BOXES["b"])
    run = _begin(tmp_path / "cache")
    with pytest.raises(ProposalImportError, match=r"1 of the 2 images .* e\.g\. b "):
        import_proposals(source, VocDataset(hand_devkit, "test"), run)
    assert not list(run.items_dir.glob("*.h5"))


def test_bad_arrays_and_conventions_are_errors(hand_devkit, tmp_path):
    source = tmp_path / "boxes.npz"
    np.savez(source, a=BOXES["a"], b=np.zeros((2, 3)))
    with pytest.raises(ProposalImportError, match=r"image b: expected an \[N, 4\] array"):
        import_proposals(source, VocDataset(hand_devkit, "test"), _begin(tmp_path / "cache"))
    with pytest.raises(ProposalImportError, match="imported_convention"):
        parse_convention(source, "xywh")
    assert parse_convention("x.mat", "auto") == ("mat", True, "yxyx")
    assert parse_convention("x.npz", "yxyx1") == ("npz", True, "yxyx")
    with pytest.raises(ProposalImportError, match="suffix"):
        parse_convention("boxes.pkl", "auto")


def test_stage_imports_and_reports_hand_worked_metrics(hand_devkit, tmp_path):
    source = tmp_path / "boxes.npz"
    np.savez(source, **BOXES)
    config = load_config(None, [f"dataset.devkit={str(hand_devkit)!r}", "dataset.test_split='test'",
                                f"proposals.imported={str(source)!r}", "proposals.min_size=0"])
    planner = Planner(ArtifactStore(tmp_path / "cache"), config)
    plan = planner.plan("proposals", "test")
    manifest, ran = run_stage(planner, proposals, plan, RunOptions(), log=lambda msg: None)
    assert ran and manifest.complete
    for image_id, (boxes, _) in _items(manifest).items():
        np.testing.assert_array_equal(boxes, CLEANED[image_id])
    m = manifest.metrics
    # best overlaps: cat(a) 1.0, dog(a) 0.5, cat(b) 0.6; the difficult cat does not count.
    assert m["source"] == "imported" and m["n_images"] == 2 and m["n_gt"] == 3
    assert m["mean_boxes"] == pytest.approx(2.0)  # 3 in "a" after dropping the duplicate, 1 in "b"
    assert m["recall@0.5"] == pytest.approx(1.0)
    assert m["recall@0.7"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["mabo"] == pytest.approx((0.8 + 0.5) / 2, abs=1e-4)  # ABO cat 0.8, dog 0.5
    assert m["mean_best_overlap"] == pytest.approx(0.7, abs=1e-4)
    assert m["per_class"]["cat"] == {"n_gt": 2, "recall": 1.0, "abo": pytest.approx(0.8)}
    assert m["per_class"]["dog"] == {"n_gt": 1, "recall": 1.0, "abo": pytest.approx(0.5)}
    assert m["seconds_per_image"] is None and m["empty_images"] == 0
    assert "imported boxes" in format_recall_table(m, plan.dataset)


def test_stage_counts_images_left_without_boxes(hand_devkit, tmp_path):
    source = tmp_path / "boxes.npz"
    np.savez(source, a=BOXES["a"], b=np.zeros((0, 4)))
    config = load_config(None, [f"dataset.devkit={str(hand_devkit)!r}", f"proposals.imported={str(source)!r}",
                                "proposals.min_size=8"])  # also drops the clipped 5 x 5 box
    planner = Planner(ArtifactStore(tmp_path / "cache"), config)
    manifest, _ = run_stage(planner, proposals, planner.plan("proposals", "test"), RunOptions(),
                            log=lambda msg: None)
    boxes, _ = read_proposal_item(manifest.item_path("b"))
    assert boxes.shape == (0, 4)
    assert manifest.metrics["empty_images"] == 1 and manifest.metrics["empty_image_ids"] == ["b"]
    assert manifest.metrics["mean_boxes"] == pytest.approx(1.0)
    assert manifest.metrics["recall@0.5"] == pytest.approx(2 / 3, abs=1e-4)


def test_imported_boxes_are_all_kept_unless_capped(hand_devkit, tmp_path):
    # 2,500 distinct boxes for image "a": more than proposals.max_boxes (2,000), which caps
    # computed proposals only; imported ones are all kept, as both releases use them.
    rng = np.random.default_rng(0)
    xs = [(a, b) for a in range(40) for b in range(a + 1, 41)]
    ys = [(a, b) for a in range(30) for b in range(a + 1, 31)]
    picks = rng.choice(len(xs) * len(ys), 2500, replace=False)
    many = np.array([[xs[p // len(ys)][0], ys[p % len(ys)][0], xs[p // len(ys)][1], ys[p % len(ys)][1]]
                     for p in picks], dtype=np.float64)
    source = tmp_path / "boxes.npz"
    np.savez(source, a=many, b=BOXES["b"])
    base = [f"dataset.devkit={str(hand_devkit)!r}", f"proposals.imported={str(source)!r}", "proposals.min_size=0"]
    counts = {}
    for cap in (None, 100):
        config = load_config(None, base + ([f"proposals.imported_max_boxes={cap}"] if cap else []))
        planner = Planner(ArtifactStore(tmp_path / "cache"), config)
        manifest, _ = run_stage(planner, proposals, planner.plan("proposals", "test"), RunOptions(),
                                log=lambda msg: None)
        counts[cap] = len(read_proposal_item(manifest.item_path("a"))[0])
    assert counts[None] == len(many) > 2000 and counts[100] == 100
