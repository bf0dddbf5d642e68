"""predict and export: a trained detector on plain image files gives what detect gives the split."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.cli import main
from sppcli.detector.bundle import BundleError, DetectorBundle
from sppcli.stages.predict import Detector, bundle_from_artifacts, image_files, predict_images
from tests.conftest import tiny_sets
from tests.test_pipeline_e2e import detector  # noqa: F401  (the module-scoped trained pipeline)


def _detect_items(manifests, image_id):
    with h5py.File(manifests[("detect", "test")].item_path(image_id), "r") as f:
        return f["boxes"][()], f["scores"][()], f["labels"][()]


def test_bundle_round_trips_and_predicts_what_detect_found(detector, tmp_path):  # noqa: F811
    planner, manifests = detector
    bundle = bundle_from_artifacts(planner)
    path = bundle.save(tmp_path / "detector.sppnet")
    loaded = DetectorBundle.load(path)
    assert loaded.classes == bundle.classes and loaded.layer == bundle.layer == "fc7"
    assert np.array_equal(loaded.svm_W, bundle.svm_W) and np.array_equal(loaded.svm_b, bundle.svm_b)
    assert loaded.regressor is not None and np.array_equal(loaded.regressor.coef, bundle.regressor.coef)
    for k, v in bundle.net_state.items():
        assert np.array_equal(loaded.net_state[k].numpy(), v.numpy()), k

    dataset = planner.dataset("test")
    for source in (bundle, loaded):
        run = Detector(source)
        for image_id in dataset.ids[:3]:
            found = run(dataset.load_image(image_id))
            boxes, scores, labels = _detect_items(manifests, image_id)
            assert found.scores.tobytes() == scores.tobytes() and found.labels.tobytes() == labels.tobytes()
            np.testing.assert_array_equal(found.boxes, boxes)

    out = tmp_path / "out"
    records = predict_images(Detector(loaded), [dataset.image_path(i) for i in dataset.ids[:2]], out, coco=True)
    assert len(records) == 2 and (out / f"{dataset.ids[0]}.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / f"{dataset.ids[0]}.json").read_text())
    _, scores, _ = _detect_items(manifests, dataset.ids[0])
    assert [d["score"] for d in on_disk["detections"]] == pytest.approx(sorted(scores.tolist(), reverse=True), abs=1e-5)
    assert len(json.loads((out / "detections.json").read_text())) == sum(len(r["detections"]) for r in records)


def test_cli_export_then_predict_a_folder(detector, tmp_path, tiny_devkit, tiny_weights):  # noqa: F811
    planner, _ = detector
    sets = [a for s in tiny_sets(tiny_devkit, tiny_weights) for a in ("--set", s)]
    runner = CliRunner()
    bundle = tmp_path / "d.sppnet"
    r = runner.invoke(main, ["export", "--cache-dir", str(planner.store.root), *sets, "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "photos"
    folder.mkdir()
    for image_id in planner.dataset("test").ids[:2]:
        (folder / f"{image_id}.jpg").write_bytes(planner.dataset("test").image_path(image_id).read_bytes())
    r = runner.invoke(main, ["predict", str(folder), "--bundle", str(bundle), "--out", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 2 and len(list((tmp_path / "p").glob("*.png"))) == 2
    # from the artifacts directly, without a bundle
    r = runner.invoke(main, ["predict", str(folder), "--cache-dir", str(planner.store.root), *sets,
                             "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "p" / f"{planner.dataset('test').ids[0]}.json").read_text())["detections"]
    b = json.loads((tmp_path / "q" / f"{planner.dataset('test').ids[0]}.json").read_text())["detections"]
    assert a == b


def test_bad_inputs_give_one_clear_error(tmp_path):
    junk = tmp_path / "junk.sppnet"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(BundleError, match="not a detector bundle"):
        DetectorBundle.load(junk)
    with pytest.raises(BundleError, match="no such detector bundle"):
        DetectorBundle.load(tmp_path / "missing.sppnet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jpg"):
        image_files([tmp_path / "empty"])
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "empty"), "--bundle", str(junk), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "not a detector bundle" in r.output and "Traceback" not in r.output
