"""The whole detector, stage after stage, on the tiny synthetic devkit (and `make voc2007-detect`
on the real voc-elephants photos), so that the chain the Makefile runs cannot rot; the same
devkit read as COCO JSON; and the HTML report of the run."""
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.artifacts import ArtifactStore
from sppcli.cli import main
from sppcli.pipeline import VARIANTS, Planner, RunOptions, run_stage
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
    assert re.search(r"at score > 0, \d+ of \d+ objects found, \d+ false box(es)? in 2 images", r.output)
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


@pytest.fixture(scope="module")
def coco_detector(tmp_path_factory, tiny_devkit, tiny_weights):
    """The same tiny pipeline on the same images, read as COCO JSON files (voc_to_coco)."""
    from sppcli.data.coco import voc_to_coco
    from sppcli.data.voc import VocDataset

    root = tmp_path_factory.mktemp("coco")
    files = {}
    for split in ("trainval", "test"):
        files[split] = root / f"instances_{split}.json"
        files[split].write_text(json.dumps(voc_to_coco(VocDataset(tiny_devkit, split))))
    config = tiny_config(tiny_devkit, tiny_weights, f"dataset.devkit={str(files['trainval'])!r}",
                         f"dataset.test_devkit={str(files['test'])!r}",
                         f"dataset.images={str(tiny_devkit / 'JPEGImages')!r}")
    planner = Planner(ArtifactStore(root / "cache"), config)
    manifests = {}
    for stage, split in STAGES:
        manifests[(stage, split)], _ = run_stage(planner, _module(stage), planner.plan(stage, split), RunOptions())
    sets = [a for s in tiny_sets(tiny_devkit, tiny_weights) + [
        f"dataset.devkit={str(files['trainval'])!r}", f"dataset.test_devkit={str(files['test'])!r}",
        f"dataset.images={str(tiny_devkit / 'JPEGImages')!r}"] for a in ("--set", s)]
    r = CliRunner().invoke(main, ["evaluate", "--metric", "coco", "--cache-dir", str(root / "cache"), *sets])
    assert r.exit_code == 0, r.output
    assert "coco mAP = " in r.output and "AP50 = " in r.output
    coco = planner.with_overrides(["evaluate.metric='coco'"])
    manifests["coco"] = planner.store.manifest("evaluate", coco.plan("evaluate").dataset, coco.plan("evaluate").key)
    return planner, manifests


def test_coco_dataset_runs_end_to_end_with_the_voc_datasets_results(coco_detector, detector):
    planner, manifests = coco_detector
    voc_planner, voc_manifests = detector
    assert manifests[("evaluate", "test")].dataset == planner.dataset("test").name
    assert planner.dataset("test").name.startswith("instances_test_")
    voc07 = json.loads(manifests[("evaluate", "test")].path("ap.json").read_text())
    same = json.loads(voc_manifests[("evaluate", "test")].path("ap.json").read_text())
    # the same pixels and boxes through the other reader: the same detector and the same AP
    assert voc07["ap"] == same["ap"] and voc07["n_detections"] == same["n_detections"]
    assert voc07["mAP"] > 0  # not an empty detector agreeing with itself
    coco = json.loads(manifests["coco"].path("ap.json").read_text())
    assert coco["metric"] == "coco" and set(coco["ap"]) == set(voc07["ap"])
    assert {"mAP", "AP50", "AP75", "ap50", "n_positives"} <= set(coco)
    assert 0.0 <= coco["AP75"] <= coco["AP50"] <= 1.0 and coco["mAP"] <= coco["AP50"]
    assert coco["n_positives"] == same["n_positives"]
    assert manifests["coco"].key != manifests[("evaluate", "test")].key
    assert manifests["coco"].path("pr_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Tables (id -> rows of (text, attributes) cells), every src/href, and tags seen."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self.tags = {}, [], set()
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", attrs]
            self._row.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def _rows_by_first_cell(table):
    return {row[0][0]: row for row in table[1:]}


def test_html_report_shows_the_artifacts_numbers_and_links_only_files_beside_it(detector, tmp_path,
                                                                               tiny_devkit, tiny_weights):
    from sppcli.report.html import write_html_report

    planner, manifests = detector
    pool5 = planner.with_overrides(VARIANTS["pool5"])  # a second evaluated row
    for stage, split in [("svm", None), ("detect", "test"), ("evaluate", "test")]:
        run_stage(pool5, _module(stage), pool5.plan(stage, split), RunOptions())
    page_path = write_html_report(planner, tmp_path / "report")
    page = _Page()
    page.feed(page_path.read_text())

    evaluated = {"ftfc7 bb": manifests[("evaluate", "test")],
                 "pool5": pool5.store.manifest("evaluate", pool5.plan("evaluate").dataset, pool5.plan("evaluate").key)}
    table6, per_class = _rows_by_first_cell(page.tables["table6"]), _rows_by_first_cell(page.tables["per-class"])
    assert set(per_class) == set(evaluated)
    classes = planner.dataset("test").classes
    for label, ev in evaluated.items():
        ap = json.loads(ev.path("ap.json").read_text())
        text, attrs = table6[label][1]
        assert float(attrs["data-value"]) == ap["mAP"] and text == f"{100 * ap['mAP']:.1f}"
        cells = per_class[label][2:]
        assert len(cells) == len(classes)
        for name, (text, attrs) in zip(classes, cells):
            assert float(attrs["data-value"]) == ap["ap"][name] and text == f"{100 * ap['ap'][name]:.1f}"
    assert [table6[label][1][0] for label in ("fc6", "ftfc6", "ftfc7")] == ["(not run)"] * 3

    proposals = _rows_by_first_cell(page.tables["proposals"])
    for split in ("trainval", "test"):
        m = manifests[("proposals", split)].metrics
        assert float(proposals[split][4][1]["data-value"]) == m["recall@0.5"]
    timings = _rows_by_first_cell(page.tables["timings"])
    fc = max(manifests[("detect", "test")].metrics["fc_seconds_per_image"],
             pool5.store.manifest("detect", pool5.plan("detect").dataset, pool5.plan("detect").key).metrics["fc_seconds_per_image"])
    assert float(timings["fc (fc layers + SVMs)"][1][1]["data-value"]) == fc

    # self-contained: relative links to files that exist, no script, nothing fetched from elsewhere
    assert "script" not in page.tags and "link" not in page.tags
    files = [link for link in page.links if not link.startswith("#")]
    assert files and all("://" not in f and not f.startswith("/") for f in files)
    assert all((page_path.parent / f).is_file() for f in files)
    assert (page_path.parent / "pr" / "ftfc7bb.png").read_bytes() == evaluated["ftfc7 bb"].path("pr_curves.png").read_bytes()
    drawn = [f for f in files if f.startswith("detections/") and f.endswith(".png")]
    assert len(drawn) == len(planner.dataset("test")) == 6  # the tiny test split: fewer than 12

    # the same page from the command line, into the cache by default
    sets = [a for s in tiny_sets(tiny_devkit, tiny_weights) for a in ("--set", s)]
    r = CliRunner().invoke(main, ["report", "--html", "--cache-dir", str(planner.store.root), *sets])
    assert r.exit_code == 0, r.output
    assert (planner.store.root / "report" / "index.html").read_text().count("<figure") == page_path.read_text().count("<figure")


def test_coco_detections_file_is_a_results_file_of_the_original_instances(coco_detector):
    """pycocotools' own loadRes + COCOeval on the user's file give the AP that evaluate reports."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    planner, manifests = coco_detector
    results = json.loads(manifests[("detect", "test")].path("detections.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(planner.dataset("test").json_path))
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert {r["image_id"] for r in results} <= set(gt.getImgIds())
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    ours = json.loads(manifests["coco"].path("ap.json").read_text())
    assert evaluator.stats[1] == pytest.approx(ours["AP50"], abs=1e-9)
    assert evaluator.stats[0] == pytest.approx(ours["mAP"], abs=1e-9)


def test_report_puts_each_set_of_scales_in_its_own_column(detector):
    """The paper's Table 6 has a 1-scale and a 5-scale column: `report --scales` adds a column whose
    rows are the same pipeline with other `features.scales`, each cell from that run's ap.json."""
    from sppcli.report.table6 import scale_planners, table6

    planner, manifests = detector
    one_scale = scale_planners(planner, [[128]])[1][1]
    assert list(one_scale.config.features.scales) == [128]
    variant = one_scale.with_overrides(VARIANTS["ftfc7bb"])
    for stage, split in STAGES:
        run_stage(variant, _module(stage), variant.plan(stage, split), RunOptions())
    evaluated = variant.store.manifest("evaluate", variant.plan("evaluate", "test").dataset,
                                       variant.plan("evaluate", "test").key)
    expected = json.loads(evaluated.path("ap.json").read_text())["mAP"]

    text, data = table6(planner, [[128], [96, 128]])  # the config's own scales are not repeated
    assert [c["label"] for c in data["columns"]] == ["SPP (2-sc: 96,128)", "SPP (1-sc: 128)"]
    assert data["columns"][1]["mAP"] == {"ftfc7 bb": expected}
    assert data["columns"][1]["missing"] == ["pool5", "fc6", "ftfc6", "ftfc7"]
    assert data["mAP"] == data["columns"][0]["mAP"] and "ftfc7 bb" in data["mAP"]
    header, bb = text.splitlines()[1], next(line for line in text.splitlines() if line.startswith("ftfc7 bb"))
    assert header.split() == ["SPP", "(2-sc:", "96,128)", "SPP", "(1-sc:", "128)"]
    assert bb.split()[2:] == [f"{100 * data['mAP']['ftfc7 bb']:.1f}", f"{100 * expected:.1f}"]
    pool5 = next(line for line in text.splitlines() if line.startswith("pool5"))
    assert pool5.split()[-2:] == ["(not", "run)"]

    from sppcli.report.html import write_html_report

    page = write_html_report(planner, planner.store.root / "report-scales", scale_columns=[[128]]).read_text()
    assert "SPP (1-sc: 128) mAP (%)" in page and f'data-value="{float(expected)!r}"' in page
