"""A dataset made elsewhere, from `sppcli init` to `evaluate` with no hand-edited file: the embedded
generator's images with the quirks of real third-party devkits injected (boxes at 0, 0-based
corners, extra XML fields, class names of their own), and the same dataset as COCO JSON."""
import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from sppcli.cli import main
from sppcli.config import config_to_toml
from sppcli.data.coco import voc_to_coco
from sppcli.data.voc import VocDataset
from tests.conftest import tiny_config

RENAMED = {"disc": "car", "ring": "bus", "triangle": "truck"}

COMMANDS = [["proposals", "--split", "trainval"], ["proposals", "--split", "test"],
            ["extract-features", "--split", "trainval"], ["extract-features", "--split", "test"],
            ["pool-windows", "--split", "trainval"], ["pool-windows", "--split", "test"],
            ["finetune-fc"], ["train-bbox-reg"], ["train-svm", "--variant", "ftfc7bb"],
            ["detect", "--variant", "ftfc7bb"], ["evaluate", "--variant", "ftfc7bb", "--json"]]


def _quirky_copy(devkit, root):
    """The devkit as someone else's tool writes it: other class names (and no classes.txt),
    extra fields, boxes touching the left edge written 0-based."""
    out = root / "traffic" / "VOC2007"
    shutil.copytree(devkit, out)
    (out / "classes.txt").unlink(missing_ok=True)
    for xml in sorted((out / "Annotations").glob("*.xml")):
        tree = ET.parse(xml)
        ET.SubElement(tree.getroot(), "source").text = "camera 7"
        for k, obj in enumerate(tree.getroot().iter("object")):
            name = obj.find("name")
            name.text = RENAMED.get(name.text, name.text)
            ET.SubElement(obj, "attributes").text = "occluded=0"
            if k == 0:
                obj.find("bndbox/xmin").text = "0"
        tree.write(xml)
    return out


def _base_toml(tmp_path, tiny_devkit, tiny_weights):
    base = tmp_path / "base.toml"
    base.write_text(config_to_toml(tiny_config(tiny_devkit, tiny_weights)))
    return base


def _run_all(config, cache):
    runner = CliRunner()
    outputs = []
    for command in COMMANDS:
        r = runner.invoke(main, [*command, "--config", str(config), "--cache-dir", str(cache), "-q"])
        assert r.exit_code == 0, (command, r.output)
        outputs.append(r.output)
    ap, _end = json.JSONDecoder().raw_decode(outputs[-1][outputs[-1].index("{"):])  # evaluate --json: ap.json
    return ap


def test_a_quirky_voc_devkit_runs_from_init_to_evaluate(tmp_path, tiny_devkit, tiny_weights):
    devkit = _quirky_copy(tiny_devkit, tmp_path)
    config = tmp_path / "traffic.toml"
    r = CliRunner().invoke(main, ["init", str(devkit), "--out", str(config),
                                  "--base", str(_base_toml(tmp_path, tiny_devkit, tiny_weights))])
    assert r.exit_code == 0, r.output
    assert "trainval: 8 boxes touch the image border at 0 (0-based coordinates?); clipped: " in r.output
    text = config.read_text()
    assert "car" in text and "disc" not in text and str(devkit.resolve()) in text
    ap = _run_all(config, tmp_path / "cache")
    assert (tmp_path / "cache" / "evaluate" / "traffic_VOC2007_test" / "LATEST").is_file()
    assert set(ap["ap"]) >= {"car", "bus", "truck"} and ap["mAP"] >= 0.0


def test_the_same_dataset_as_coco_json_runs_from_init_to_evaluate(tmp_path, tiny_devkit, tiny_weights):
    files = {}
    for split in ("trainval", "test"):
        files[split] = tmp_path / "annotations" / f"instances_{split}.json"
        files[split].parent.mkdir(exist_ok=True)
        files[split].write_text(json.dumps(voc_to_coco(VocDataset(tiny_devkit, split))))
    config = tmp_path / "coco.toml"
    r = CliRunner().invoke(main, [
        "init", str(files["trainval"]), "--images", str(tiny_devkit / "JPEGImages"), "--out", str(config),
        "--base", str(_base_toml(tmp_path, tiny_devkit, tiny_weights)),
        "--set", f"dataset.test_devkit={json.dumps(str(files['test']))}"])
    assert r.exit_code == 0, r.output
    assert re.search(r"dataset.classes = \[.*disc.*\].*category-id order", r.output)
    ap = _run_all(config, tmp_path / "cache")
    assert [p.name[:15] for p in (tmp_path / "cache" / "evaluate").iterdir()] == ["instances_test_"]
    assert set(ap["ap"]) == set(VocDataset(tiny_devkit, "test").classes)


def test_init_says_what_it_needs(tmp_path, tiny_devkit):
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    r = CliRunner().invoke(main, ["init", str(stray), "--out", str(tmp_path / "x.toml")])
    assert r.exit_code != 0 and "neither a VOC-format devkit folder nor a COCO instances .json" in r.output
    assert not (tmp_path / "x.toml").exists()


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("SPPCLI_NO_PROGRESS", "1")


def test_ids_without_annotations_are_named_then_skipped(tmp_path, tiny_devkit, tiny_weights):
    devkit = tmp_path / "mine" / "VOC2007"
    shutil.copytree(tiny_devkit, devkit)
    lost = VocDataset(devkit, "trainval").ids[:2]
    for image_id in lost:
        (devkit / "Annotations" / f"{image_id}.xml").unlink()
    config, base = tmp_path / "mine.toml", _base_toml(tmp_path, tiny_devkit, tiny_weights)
    runner = CliRunner()
    r = runner.invoke(main, ["init", str(devkit), "--out", str(config), "--base", str(base)])
    assert r.exit_code == 1 and not config.exists()
    assert f"trainval.txt: 2 of 8 images have no annotation file in {devkit / 'Annotations'}: {', '.join(lost)}" in r.output
    assert "--set dataset.missing_annotations='\"skip\"'" in r.output

    r = runner.invoke(main, ["init", str(devkit), "--out", str(config), "--base", str(base),
                             "--set", 'dataset.missing_annotations="skip"'])
    assert r.exit_code == 0, r.output
    assert "6 trainval images surveyed" in r.output and 'missing_annotations = "skip"' in config.read_text()
    r = runner.invoke(main, ["proposals", "--split", "trainval", "--config", str(config),
                             "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "skipping 2 of 8 images that have no annotation file" in r.output
    items = sorted(p.stem for p in (tmp_path / "cache" / "proposals").rglob("items/*.h5"))
    assert items == sorted(set(VocDataset(tiny_devkit, "trainval").ids) - set(lost))
