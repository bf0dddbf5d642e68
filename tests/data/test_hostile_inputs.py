"""User devkits with the faults real ones have: each gives one clear message naming the file (or
one summary line per kind of repair), and the cache keys follow the pixels, not just the XML."""
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from sppcli import artifacts
from sppcli.artifacts import ArtifactStore
from sppcli.data.voc import VocDataset, VocError
from sppcli.pipeline import Planner, run_stage
from tests.conftest import tiny_config
from tests.data.test_voc import _devkit, _jpeg, _object_xml, _xml


def _two_image_copy(tiny_devkit, root):
    """A devkit holding the first two trainval images of ``tiny_devkit`` (fast to propose on)."""
    out = root / "VOCdevkit" / "VOC2007"
    shutil.copytree(tiny_devkit, out)
    ids = VocDataset(out, "trainval").ids[:2]
    (out / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    return out


def _proposals_key(devkit, cache):
    planner = Planner(ArtifactStore(cache), tiny_config(devkit))
    return planner, planner.plan("proposals", "trainval")


def _repaint(path):
    pixels = np.asarray(Image.open(path)).copy()
    pixels[:20, :20] = 255 - pixels[:20, :20]
    Image.fromarray(pixels).save(path, quality=95)


def test_image_edited_in_place_makes_proposals_stale(tmp_path, tiny_devkit):
    devkit = _two_image_copy(tiny_devkit, tmp_path)
    cache = tmp_path / "cache"
    planner, plan = _proposals_key(devkit, cache)
    run_stage(planner, "sppcli.stages.proposals", plan)
    planner, again = _proposals_key(devkit, cache)
    assert planner.state(again).state == "complete"

    ds = VocDataset(devkit, "trainval")
    _repaint(ds.image_path(ds.ids[1]))
    planner, edited = _proposals_key(devkit, cache)
    assert edited.key != plan.key
    assert planner.state(edited).state != "complete"


def test_devkits_whose_folder_names_collide_get_different_keys(tmp_path, tiny_devkit):
    first = _two_image_copy(tiny_devkit, tmp_path / "a")
    second = _two_image_copy(tiny_devkit, tmp_path / "b")
    cache = tmp_path / "cache"
    assert _proposals_key(first, cache)[1].key == _proposals_key(second, cache)[1].key  # same bytes
    ds = VocDataset(second, "trainval")
    _repaint(ds.image_path(ds.ids[0]))
    assert VocDataset(first, "trainval").name == ds.name  # VOCdevkit_VOC2007_trainval both
    assert _proposals_key(first, cache)[1].key != _proposals_key(second, cache)[1].key


def test_second_key_computation_reads_no_image(tmp_path, tiny_devkit, monkeypatch):
    devkit = _two_image_copy(tiny_devkit, tmp_path)
    cache = tmp_path / "cache"
    first = _proposals_key(devkit, cache)[1].key
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(artifacts, "open", counting_open, raising=False)
    assert _proposals_key(devkit, cache)[1].key == first  # a new planner and memo object
    assert opened == []
    _repaint(VocDataset(devkit, "trainval").image_path(VocDataset(devkit, "trainval").ids[0]))
    _proposals_key(devkit, cache)
    assert len(opened) == 1 and opened[0].endswith(".jpg")  # only the changed image is read


def test_image_size_disagreeing_with_xml_is_refused_naming_both(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [_object_xml("cat", (1, 1, 9, 9))]),
                                      "b": _xml("b.jpg", [_object_xml("cat", (1, 1, 9, 9))])})
    _jpeg(root / "JPEGImages" / "a.jpg")
    _jpeg(root / "JPEGImages" / "b.jpg", size=(80, 60))  # the XML says 40x30
    ds = VocDataset(root, "all", ["cat"])
    with pytest.raises(VocError, match=r"Annotations/b\.xml: <size> is 40x30 but .*JPEGImages/b\.jpg is 80x60 pixels"):
        ds.check_inputs()


@pytest.mark.parametrize("content", ["", "\n  \n", "\ufeff\n"])
def test_empty_split_is_refused(tmp_path, content):
    root = _devkit(tmp_path / "kit", {})
    (root / "ImageSets/Main/all.txt").write_text(content, encoding="utf-8")
    with pytest.raises(VocError, match=r"all\.txt lists no images; "):
        VocDataset(root, "all", ["cat"])


def test_bom_in_split_file_is_stripped(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", []), "b": _xml("b.jpg", [])})
    (root / "ImageSets/Main/all.txt").write_bytes("\ufeffa\r\nb\r\n".encode("utf-8"))
    assert VocDataset(root, "all", ["cat"]).ids == ("a", "b")


@pytest.mark.parametrize("box, words", [((10, 9, 5, 20), "xmin 10 > xmax 5"), ((3, 20, 9, 4), "ymin 20 > ymax 4")])
def test_inverted_box_is_named_as_inverted(tmp_path, box, words):
    objects = [_object_xml("cat", (1, 1, 9, 9)), _object_xml("cat", box)]
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", objects)})
    _jpeg(root / "JPEGImages" / "a.jpg")
    with pytest.raises(VocError, match=rf"a\.xml: object 2 \(cat\) box is inverted: {words}; swap"):
        VocDataset(root, "all", ["cat"]).ground_truth("a")


def _devkit_missing(tmp_path, n_missing):
    entries = {f"m{k:02d}": None for k in range(n_missing)}
    entries.update({"a": _xml("a.jpg", [_object_xml("cat", (1, 1, 9, 9))])})
    root = _devkit(tmp_path / "kit", entries)
    for image_id in entries:  # the XML says 40x30; images without one are another size
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg", size=(50, 20) if image_id != "a" else (40, 30))
    return root


def test_missing_annotations_error_lists_first_ten_and_count(tmp_path):
    root = _devkit_missing(tmp_path, 12)
    with pytest.raises(VocError) as error:
        VocDataset(root, "all", ["cat"])
    message = str(error.value)
    assert "all.txt: 12 of 13 images have no annotation file" in message
    assert "m00, m01, m02, m03, m04, m05, m06, m07, m08, m09 (and 2 more)" in message
    assert "m10" not in message and 'dataset.missing_annotations = "empty"' in message


def test_missing_annotations_empty_and_skip(tmp_path, caplog):
    root = _devkit_missing(tmp_path, 2)
    empty = VocDataset(root, "all", ["cat"], missing_annotations="empty")
    assert empty.ids == ("m00", "m01", "a")
    assert empty.annotation("m00").objects == () and (empty.annotation("m00").width, empty.annotation("m00").height) == (50, 20)
    assert len(empty.ground_truth("m01")) == 0 and len(empty.ground_truth("a")) == 1
    empty.check_inputs()  # no XML size to disagree with

    with caplog.at_level(logging.WARNING, logger="sppcli.data"):
        skip = VocDataset(root, "all", ["cat"], missing_annotations="skip")
    assert skip.ids == ("a",)
    assert [r.getMessage() for r in caplog.records if r.name == "sppcli.data"] == [
        'all: skipping 2 of 3 images that have no annotation file (dataset.missing_annotations = "skip")']
    assert set(skip.external_files()) < set(empty.external_files())  # so the keys differ
    with pytest.raises(VocError, match="missing_annotations = 'sometimes': expected one of error, empty, skip"):
        VocDataset(root, "all", ["cat"], missing_annotations="sometimes")


def test_all_skipped_is_an_empty_split(tmp_path):
    root = _devkit(tmp_path / "kit", {"x": None, "y": None})
    with pytest.raises(VocError, match=r"all\.txt lists no images with an annotation file \(all 2 skipped"):
        VocDataset(root, "all", ["cat"], missing_annotations="skip")


def test_repairs_are_one_log_record_per_kind_and_split(tmp_path, caplog):
    entries = {}
    for k in range(5):  # 5 files with a 0-based corner, 2 of them with two
        objects = [_object_xml("cat", (0, 3, 9, 9))] * (2 if k < 2 else 1)
        entries[f"z{k}"] = _xml(f"z{k}.jpg", objects + [_object_xml("dog", (2, 2, 9, 9))])
    entries["c"] = _xml("c.jpg", [_object_xml("cat", (5, 5, 60, 20))])   # past the right edge
    entries["d"] = _xml("d.jpg", [_object_xml("cat", (50, 5, 60, 20))])  # wholly outside
    root = _devkit(tmp_path / "kit", entries)
    for image_id in entries:
        _jpeg(root / "JPEGImages" / f"{image_id}.jpg")
    ds = VocDataset(root, "all", ["cat"])
    with caplog.at_level(logging.WARNING, logger="sppcli.data"):
        for image_id in ds.ids:
            ds.ground_truth(image_id)
        ds.check_inputs()
    records = [r for r in caplog.records if r.name == "sppcli.data"]
    assert [r.getMessage() for r in records] == [
        "all: 7 boxes touch the image border at 0 (0-based coordinates?); clipped: z0.xml, z1.xml, z2.xml, ...",
        "all: 1 boxes lie partly outside the image; clipped: c.xml",
        "all: 1 boxes have no area inside the image; dropped: d.xml",
        f"all: ignoring objects whose class is not one of 1 classes ({root}): 'dog': 5",
    ]
    assert all(r.levelno == logging.WARNING for r in records)


def test_corrupt_image_in_a_dataloader_worker_is_one_line(tmp_path, tiny_devkit, tiny_weights, monkeypatch):
    from click.testing import CliRunner

    from sppcli.cli import main
    from tests.conftest import tiny_sets

    monkeypatch.setenv("SPPCLI_NO_PROGRESS", "1")
    devkit = _two_image_copy(tiny_devkit, tmp_path)
    ds = VocDataset(devkit, "trainval")
    broken = ds.image_path(ds.ids[1])
    broken.write_bytes(broken.read_bytes()[:1000])  # the header (size) survives, the pixels do not
    sets = [a for s in tiny_sets(devkit, tiny_weights) for a in ("--set", s)]
    r = CliRunner().invoke(main, ["extract-features", "--split", "trainval", "--workers", "1",
                                  "--cache-dir", str(tmp_path / "cache"), *sets])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines[-1].startswith(f"Error: {broken}: cannot decode image (")
    assert "DataLoader worker" not in r.output and "Traceback" not in r.output


def test_coco_image_size_disagreeing_with_json_is_refused(tmp_path, tiny_devkit):
    import json

    from sppcli.data.coco import CocoDataset, voc_to_coco

    devkit = _two_image_copy(tiny_devkit, tmp_path)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(voc_to_coco(VocDataset(devkit, "trainval"))))
    CocoDataset(instances, devkit / "JPEGImages", "trainval").check_inputs()  # agrees
    ds = CocoDataset(instances, devkit / "JPEGImages", "trainval")
    image = ds.image_path(ds.ids[1])
    Image.open(image).resize((80, 60)).save(image)
    with pytest.raises(VocError, match=rf"instances\.json: image id {ds.ids[1]} is 160x120 but .*{image.name} is 80x60 pixels"):
        ds.check_inputs()
