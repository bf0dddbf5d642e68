"""The whole detector, stage after stage, on the tiny synthetic devkit (and `make voc2007-detect`
on the real voc-elephants photos), so that the chain the Makefile runs cannot rot."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.artifacts import ArtifactStore
from sppcli.cli import main
from sppcli.pipeline import Planner, RunOptions, run_stage
from tests.conftest import REPO, tiny_config, tiny_sets

STAGES = [("proposals", "trainval"), ("proposals", "test"), ("features", "trainval"), ("features", "test"),
          ("pool", "trainval"), ("pool", "test"), ("finetune", None), ("bbox_reg", None), ("svm", None),
          ("detect", "test"), ("evaluate", "test")]


def _module(stage):
    import importlib

    return importlib.import_module(f"sppcli.stages.{stage}")


@pytest.fixture(scope="module")
def detector(tmp_path_factory, tiny_devkit, tiny_weights):
    cache = tmp_path_factory.mktemp("e2e") / "cache"
    planner = Planner(ArtifactStore(cache), tiny_config(tiny_devkit, tiny_weights))
    manifests = {}
    for stage, split in STAGES:
        m, ran = run_stage(planner, _module(stage), planner.plan(stage, split), RunOptions())
        assert ran
        manifests[(stage, split)] = m
    return planner, manifests


def test_every_stage_completes_and_a_rerun_does_nothing(detector):
    planner, manifests = detector
    for stage, split in STAGES:
        m, ran = run_stage(planner, _module(stage), planner.plan(stage, split), RunOptions())
        assert not ran and m.key == manifests[(stage, split)].key
    st = planner.state(planner.plan("evaluate", "test"))
    assert st.state == "complete"


def test_detections_and_result_files(detector):
    planner, manifests = detector
    det = manifests[("detect", "test")]
    ds = planner.dataset("test")
    with h5py.File(det.path("detections.h5"), "r") as f:
        scores, boxes, index = f["scores"][()], f["boxes"][()], f["image_index"][()]
    assert len(scores) == det.metrics["n_detections"]
    # boxes inside the image they belong to; at most 100 per image
    for i, image_id in enumerate(ds.ids):
        gt = ds.ground_truth(image_id)
        sel = index == i
        assert sel.sum() <= 100
        assert np.all(boxes[sel, :2] >= 0) and np.all(boxes[sel, 2] <= gt.width) and np.all(boxes[sel, 3] <= gt.height)
    # VOC result files: 1-based pixels, one per class, same count as the HDF5
    lines = 0
    for name in ds.classes:
        path = det.path(f"results/comp4_det_test_{name}.txt")
        rows = [r.split() for r in path.read_text().splitlines()]
        lines += len(rows)
        for r in rows:
            assert r[0] in ds.ids and float(r[2]) >= 1 and float(r[3]) >= 1
    assert lines == len(scores)
    coco = json.loads(det.path("detections.json").read_text())
    assert len(coco) == len(scores)


def test_evaluation_files(detector):
    planner, manifests = detector
    ev = manifests[("evaluate", "test")]
    ap = json.loads(ev.path("ap.json").read_text())
    assert ap["metric"] == "voc2007" and set(ap["ap"]) == set(planner.dataset("test").classes)
    assert 0.0 <= ap["mAP"] <= 1.0
    assert ev.path("pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changing_a_detect_param_reruns_only_detect_and_evaluate(detector):
    planner, manifests = detector
    other = planner.with_overrides(["detect.nms_iou=0.5"])
    assert other.plan("svm").key == manifests[("svm", None)].key
    assert other.state(other.plan("detect", "test")).state == "stale"
    reasons = other.state(other.plan("detect", "test")).reasons
    assert any("detect.nms_iou 0.3 -> 0.5" in r for r in reasons)


def test_cli_status_report_show_and_combine(detector, tmp_path, tiny_devkit, tiny_weights):
    planner, manifests = detector
    cache = str(planner.store.root)
    sets = [a for s in tiny_sets(tiny_devkit, tiny_weights) for a in ("--set", s)]
    runner = CliRunner()
    r = runner.invoke(main, ["status", "--cache-dir", cache, *sets])
    assert r.exit_code == 0, r.output
    assert "evaluate" in r.output and "complete" in r.output
    r = runner.invoke(main, ["report", "--cache-dir", cache, *sets])
    assert r.exit_code == 0, r.output
    assert "ftfc7 bb" in r.output and "Table 6" in r.output
    r = runner.invoke(main, ["show", "--cache-dir", cache, *sets, "--limit", "2", "--out", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 2
    # model combination with itself: the union of identical windows after NMS is the same set
    det_dir = str(manifests[("detect", "test")].dir)
    r = runner.invoke(main, ["detect", "--cache-dir", cache, *sets, "--combine", det_dir, "--json"])
    assert r.exit_code == 0, r.output
    combined = json.loads(r.stdout)
    assert combined["metrics"]["n_detections"] == manifests[("detect", "test")].metrics["n_detections"]
    r = runner.invoke(main, ["evaluate", "--cache-dir", cache, *sets, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metric"] == "voc2007"


def test_make_voc2007_detect_on_real_photos(tmp_path, elephants_devkit, tiny_weights):
    """The real target with the paper's config, shrunk by VOC_EXTRA to run in seconds."""
    extra = " ".join([
        "--set 'dataset.classes=[\"elephant\"]'", "--set net.width=0.125", "--set net.hidden=64",
        "--set proposals.max_boxes=100", "--set proposals.max_side=200",
        "--set finetune.iterations=10", "--set finetune.lr_step=8", "--set finetune.batch_size=16",
        "--set finetune.checkpoint_every=5",
    ])
    env = {**os.environ, "SPPCLI_NO_PROGRESS": "1"}
    cmd = ["make", "-s", "voc2007-detect", "SETUP=", f"SPP={sys.executable} -m sppcli", f"VOC_ROOT={elephants_devkit}",
           f"WEIGHTS={tiny_weights}", "SCALES=1", "VOC_SCALES_1=160", "WORKERS=1", "DEVICE=cpu",
           f"CACHE={tmp_path / 'cache'}", f"VOC_EXTRA={extra}"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Table 6" in result.stdout and "ftfc7 bb" in result.stdout
    aps = list((tmp_path / "cache" / "evaluate").rglob("ap.json"))
    assert len(aps) == 1 and "elephant" in json.loads(aps[0].read_text())["ap"]
    # interrupted anywhere, the same command resumes: here everything is done, so all up to date
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stderr.count("up to date") >= 10


@pytest.mark.parametrize("overrides", [("detect.precision=bfloat16",), ("detect.svd_ranks=[56, 56]",)])
def test_fast_detection_options_move_scores_only_a_little(detector, overrides):
    planner, manifests = detector
    fast = planner.with_overrides(list(overrides) + ["detect.bbox_reg=false", "detect.score_threshold=-100",
                                                     "detect.max_per_class_factor=1000"])
    exact = planner.with_overrides(["detect.bbox_reg=false", "detect.score_threshold=-100",
                                    "detect.max_per_class_factor=1000"])
    a, _ = run_stage(exact, _module("detect"), exact.plan("detect", "test"), RunOptions(), log=lambda m: None)
    b, _ = run_stage(fast, _module("detect"), fast.plan("detect", "test"), RunOptions(), log=lambda m: None)
    assert a.key != b.key
    with h5py.File(a.path("detections.h5"), "r") as f, h5py.File(b.path("detections.h5"), "r") as g:
        sa, sb = np.sort(f["scores"][()]), np.sort(g["scores"][()])
    # every window scored (threshold -100): the score distributions agree closely
    assert abs(len(sa) - len(sb)) <= 0.05 * len(sa)
    top = min(len(sa), len(sb), 50)
    assert np.abs(sa[-top:] - sb[-top:]).max() < 0.1 * (sa.max() - sa.min())
