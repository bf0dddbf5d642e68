"""The proposals stage on the tiny synthetic devkit: resumption, up-to-date, workers, errors."""
import shutil

import numpy as np
import pytest

from sppcli.artifacts import ArtifactStore
from sppcli.data.voc import VocError
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.data.proposal_recall import best_overlaps, format_recall_table
from sppcli.stages import proposals
from sppcli.stages.proposals import read_proposal_item, selective_search
from tests.conftest import tiny_config

SPLIT = "test"  # 6 images of 160 x 120


def _run(devkit, cache, workers=1, *overrides):
    planner = Planner(ArtifactStore(cache), tiny_config(devkit, None, *overrides))
    plan = planner.plan("proposals", SPLIT)
    manifest, ran = run_stage(planner, proposals, plan, RunOptions(workers=workers), log=lambda msg: None)
    return planner, plan, manifest, ran


def _boxes(manifest, ids):
    return {i: read_proposal_item(manifest.item_path(i))[0] for i in ids}


@pytest.fixture(scope="module")
def reference(tiny_devkit, tmp_path_factory):
    """An uninterrupted single-process run: (planner, plan, manifest, boxes by id)."""
    planner, plan, manifest, ran = _run(tiny_devkit, tmp_path_factory.mktemp("ref") / "cache")
    assert ran
    ids = planner.dataset(SPLIT).ids
    return planner, plan, manifest, _boxes(manifest, ids)


def test_items_follow_the_schema_and_params(reference, tiny_devkit):
    planner, plan, manifest, boxes = reference
    dataset = planner.dataset(SPLIT)
    assert manifest.complete and manifest.n_items == len(dataset) == len(boxes)
    for image_id, b in boxes.items():
        _, attrs = read_proposal_item(manifest.item_path(image_id))
        assert (attrs["width"], attrs["height"]) == (160, 120)
        assert attrs["seconds"] > 0
        assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4
        assert 0 < len(b) <= 150  # tiny config: max_boxes=150
        assert np.all(b[:, :2] >= 0) and np.all(b[:, 2] <= 160) and np.all(b[:, 3] <= 120)
        assert np.all(np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= 8)  # min_size=8
        assert np.array_equal(b, np.round(b))
        assert len(np.unique(b, axis=0)) == len(b)


def test_metrics_match_a_slow_recomputation(reference):
    planner, plan, manifest, boxes = reference
    dataset = planner.dataset(SPLIT)
    best, labels = [], []
    for image_id in dataset.ids:
        gt = dataset.ground_truth(image_id)
        for g, label, difficult in zip(gt.boxes.astype(np.float64), gt.labels, gt.difficult):
            if difficult:
                continue
            overlaps = []
            for b in boxes[image_id].astype(np.float64):
                iw = max(0.0, min(g[2], b[2]) - max(g[0], b[0]))
                ih = max(0.0, min(g[3], b[3]) - max(g[1], b[1]))
                union = (g[2] - g[0]) * (g[3] - g[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
                overlaps.append(iw * ih / union)
            best.append(max(overlaps))
            labels.append(label)
    best, labels = np.array(best), np.array(labels)
    m = manifest.metrics
    assert m["n_gt"] == len(best) and m["n_images"] == len(dataset)
    assert m["mean_boxes"] == pytest.approx(np.mean([len(b) for b in boxes.values()]), abs=0.01)
    assert m["recall@0.5"] == pytest.approx(np.mean(best >= 0.5), abs=1e-4)
    assert m["recall@0.7"] == pytest.approx(np.mean(best >= 0.7), abs=1e-4)
    assert m["mean_best_overlap"] == pytest.approx(best.mean(), abs=1e-4)
    abo = [best[labels == c].mean() for c in sorted(set(labels.tolist()))]
    assert m["mabo"] == pytest.approx(np.mean(abo), abs=1e-4)
    assert sum(row["n_gt"] for row in m["per_class"].values()) == len(best)
    table = format_recall_table(m, plan.dataset)
    assert plan.dataset in table and "recall @ IoU 0.5" in table and dataset.classes[0] in table


def test_second_run_is_up_to_date(reference, tiny_devkit):
    planner, plan, manifest, _ = reference
    again, ran = run_stage(planner, proposals, plan, RunOptions(), log=lambda msg: None)
    assert not ran and again.key == manifest.key


def test_killed_run_resumes_to_identical_boxes(reference, tiny_devkit, tmp_path, monkeypatch):
    _, _, _, expected = reference
    real = proposals._propose_image
    calls = []

    def dies_on_third_image(task, **kwargs):
        calls.append(task[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C looks like in the loop
        return real(task, **kwargs)

    monkeypatch.setattr(proposals, "_propose_image", dies_on_third_image)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_devkit, tmp_path / "cache")
    monkeypatch.setattr(proposals, "_propose_image", real)

    planner = Planner(ArtifactStore(tmp_path / "cache"), tiny_config(tiny_devkit))
    plan = planner.plan("proposals", SPLIT)
    state = planner.state(plan)
    assert state.state == "partial" and state.done_items == 2

    resumed_calls = []
    monkeypatch.setattr(proposals, "_propose_image",
                        lambda task, **kwargs: resumed_calls.append(task[0]) or real(task, **kwargs))
    _, _, manifest, ran = _run(tiny_devkit, tmp_path / "cache")
    assert ran and manifest.complete
    assert resumed_calls == list(planner.dataset(SPLIT).ids[2:])  # finished images are skipped
    resumed = _boxes(manifest, expected)
    for image_id, b in expected.items():
        assert resumed[image_id].tobytes() == b.tobytes(), image_id


def test_two_workers_give_the_same_boxes(reference, tiny_devkit, tmp_path):
    _, _, ref_manifest, expected = reference
    _, _, manifest, ran = _run(tiny_devkit, tmp_path / "cache", 2)
    assert ran and manifest.key == ref_manifest.key
    got = _boxes(manifest, expected)
    for image_id, b in expected.items():
        assert got[image_id].tobytes() == b.tobytes(), image_id


def test_selective_search_is_deterministic_and_scales_back(tiny_devkit):
    from sppcli.data.voc import VocDataset

    dataset = VocDataset(tiny_devkit, SPLIT)
    image = dataset.load_image(dataset.ids[0])
    first = selective_search(image, "fast", 2000, 0, 500)
    assert np.array_equal(first, selective_search(image, "fast", 2000, 0, 500))
    # Shrinking for the segmentation must still give boxes in original pixels.
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)  # 320 x 240
    shrunk = selective_search(big, "fast", 2000, 0, 160)
    assert shrunk.max(axis=0)[2] <= 320 and shrunk.max(axis=0)[3] <= 240
    assert shrunk[:, 2].max() > 200  # boxes reach beyond the 160-pixel working image
    gt = dataset.ground_truth(dataset.ids[0])
    assert np.all(best_overlaps(gt.boxes * 2, shrunk)[~gt.difficult] > 0.5)
    with pytest.raises(ValueError, match="mode"):
        selective_search(image, "exhaustive")


def test_corrupt_image_names_the_file_and_keeps_finished_items(tiny_devkit, tmp_path):
    devkit = tmp_path / "VOC2007"
    shutil.copytree(tiny_devkit, devkit)
    planner = Planner(ArtifactStore(tmp_path / "cache"), tiny_config(devkit))
    ids = planner.dataset(SPLIT).ids
    bad = planner.dataset(SPLIT).image_path(ids[2])
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(VocError, match=bad.name):
        _run(devkit, tmp_path / "cache")
    plan = planner.plan("proposals", SPLIT)
    run_dir = planner.store.run_dir("proposals", plan.dataset, plan.key)
    assert sorted(p.stem for p in (run_dir / "items").glob("*.h5")) == sorted(ids[:2])
    assert not (run_dir / "manifest.json").exists()


def test_bad_mode_is_rejected_before_any_work(tiny_devkit, tmp_path):
    with pytest.raises(ValueError, match="proposals.mode must be one of fast, quality, single"):
        _run(tiny_devkit, tmp_path / "cache", 1, "proposals.mode=fastest")


def test_low_recall_is_warned_with_the_option_to_change(tiny_devkit, tmp_path, caplog):
    # windows under 60 px dropped on 160 x 120 images: the small objects have none left
    with caplog.at_level("WARNING", logger="sppcli.stages.proposals"):
        _, _, manifest, _ = _run(tiny_devkit, tmp_path / "c", 1, "proposals.min_size=60")
    assert manifest.metrics["recall@0.5"] < 0.8
    warned = [r.getMessage() for r in caplog.records if "recall at IoU 0.5" in r.getMessage()]
    assert len(warned) == 1 and "proposals.min_size = 60" in warned[0] and "objects under 32 px" in warned[0]
    assert "recall@0.5 by object size" in format_recall_table(manifest.metrics, "test")
