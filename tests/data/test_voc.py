"""VOC devkit reader/writer: the real-photo elephants devkit, and one fixture per quirk and error."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sppcli.data.voc import (
    VOC_CLASSES, VocAnnotation, VocDataset, VocError, VocObject, class_presence,
    internal_box_to_voc, resolve_classes, voc_box_to_internal, write_annotation,
    write_class_image_sets, write_image_set,
)

# Read off the elephants' XML by hand (1-based inclusive), per id.
ELEPHANT_BOXES_VOC = {
    "000001": [(41, 50, 389, 303)],
    "000006": [(53, 112, 245, 239), (339, 162, 466, 264)],
    "000010": [(13, 4, 292, 324)],
}


@pytest.fixture()
def elephants(elephants_devkit) -> Path:  # from tests/conftest.py; skips when absent
    return elephants_devkit


# ---------------------------------------------------------------------------------------------
# the one conversion


def test_voc_to_internal_hand_worked():
    # whole 500 x 334 image; a single pixel at column 5, row 7 (1-based)
    voc = np.array([[1, 1, 500, 334], [5, 7, 5, 7]])
    internal = voc_box_to_internal(voc)
    np.testing.assert_array_equal(internal, [[0, 0, 500, 334], [4, 6, 5, 7]])
    assert internal.dtype == np.float64
    # width in the internal convention equals VOC's "xmax - xmin + 1"
    np.testing.assert_array_equal(internal[:, 2] - internal[:, 0], voc[:, 2] - voc[:, 0] + 1)


def test_box_conversion_round_trip_and_shapes():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 500, (7, 3, 4))
    np.testing.assert_allclose(internal_box_to_voc(voc_box_to_internal(boxes)), boxes)
    np.testing.assert_allclose(voc_box_to_internal(internal_box_to_voc(boxes)), boxes)
    single = (10.0, 20.0, 30.0, 40.0)
    np.testing.assert_array_equal(internal_box_to_voc(single), [11, 21, 30, 40])
    assert voc_box_to_internal(single).shape == (4,)
    original = np.array(single)
    voc_box_to_internal(original)
    np.testing.assert_array_equal(original, single)  # inputs are not modified in place


# ---------------------------------------------------------------------------------------------
# the real-photo devkit


def test_elephants_ids_names_and_order(elephants):
    ds = VocDataset(elephants, "trainval", ["elephant"])
    listed = [line.strip() for line in (elephants / "ImageSets/Main/trainval.txt").read_text().splitlines()
              if line.strip()]
    assert ds.ids == tuple(listed) and len(ds) == len(listed) == 8
    assert ds.name == "voc-elephants_VOC2007_trainval"
    assert ds.classes == ("elephant",)
    assert len(VocDataset(elephants, "test", ["elephant"])) == 2


def test_elephants_annotations_and_ground_truth(elephants):
    ds = VocDataset(elephants, "trainval", ["elephant"])
    test = VocDataset(elephants, "test", ["elephant"])
    for image_id, voc_boxes in ELEPHANT_BOXES_VOC.items():
        dataset = ds if image_id in ds.ids else test
        ann = dataset.annotation(image_id)
        expected = [(x1 - 1, y1 - 1, x2, y2) for x1, y1, x2, y2 in voc_boxes]
        assert [o.box for o in ann.objects] == expected
        assert all(o.name == "elephant" and not o.difficult and not o.truncated for o in ann.objects)
        gt = dataset.ground_truth(image_id)
        assert gt.boxes.dtype == np.float32 and gt.boxes.shape == (len(voc_boxes), 4)
        assert gt.labels.dtype == np.int64 and gt.difficult.dtype == bool and gt.truncated.dtype == bool
        np.testing.assert_array_equal(gt.boxes, expected)
        np.testing.assert_array_equal(gt.labels, 0)
        assert (gt.width, gt.height) == (ann.width, ann.height)
    assert ds.annotation("000006") is ds.annotation("000006")  # cached


def test_elephants_images_match_annotated_sizes(elephants):
    ds = VocDataset(elephants, "trainval", ["elephant"])
    for image_id in ds.ids:
        image = ds.load_image(image_id)
        ann = ds.annotation(image_id)
        assert image.dtype == np.uint8 and image.shape == (ann.height, ann.width, 3)
        assert ds.image_path(image_id) == elephants / "JPEGImages" / f"{image_id}.jpg"
    assert ds.annotation("000003").height == 375


def _data_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sppcli.data"]


def test_elephants_under_voc_classes_warns_once_with_counts(elephants, caplog):
    ds = VocDataset(elephants, "trainval")
    assert ds.classes == VOC_CLASSES
    gts = [ds.ground_truth(i) for i in ds.ids]
    messages = _data_messages(caplog)
    assert len(messages) == 1 and "'elephant': 9" in messages[0]
    assert all(len(gt) == 0 and gt.boxes.shape == (0, 4) for gt in gts)
    assert ds.unknown_name_counts() == {"elephant": 9}


def test_elephants_external_files(elephants):
    ds = VocDataset(elephants, "val", ["elephant"])
    files = ds.external_files()
    assert files[0] == elephants / "ImageSets/Main/val.txt"
    assert files[1:] == ([elephants / "Annotations" / f"{i}.xml" for i in ds.ids]
                         + [ds.image_path(i) for i in ds.ids])
    assert all(f.is_file() for f in files)


def test_elephants_write_read_round_trip(elephants, tmp_path):
    ds = VocDataset(elephants, "trainval", ["elephant"])
    copy = tmp_path / "VOC2007"
    shutil.copytree(elephants / "JPEGImages", copy / "JPEGImages")
    for image_id in ds.ids:
        write_annotation(copy / "Annotations" / f"{image_id}.xml", ds.annotation(image_id), f"{image_id}.jpg")
    write_image_set(copy, "trainval", ds.ids)
    again = VocDataset(copy, "trainval", ["elephant"])
    assert again.ids == ds.ids
    for image_id in ds.ids:
        assert again.annotation(image_id) == ds.annotation(image_id)
    assert not [p for p in (copy / "Annotations").iterdir() if p.suffix != ".xml"]  # no temp files left


# ---------------------------------------------------------------------------------------------
# quirk fixtures


def _object_xml(name, box, difficult=0, truncated=0, extra=""):
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box) if v is not None)
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>{truncated}</truncated>"
            f"<difficult>{difficult}</difficult>{extra}<bndbox>{coords}</bndbox></object>")


def _xml(filename, objects, size=(40, 30), extra=""):
    size_xml = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return f"<annotation><folder>X</folder><filename>{filename}</filename>{extra}{size_xml}{''.join(objects)}</annotation>"


def _devkit(root: Path, entries: dict[str, str], classes_txt: str | None = None, split: str = "all") -> Path:
    """Devkit with an RGB 40x30 JPEG per id (unless an entry's image is written separately)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, xml in entries.items():
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in entries))
    if classes_txt is not None:
        (root / "classes.txt").write_text(classes_txt)
    return root


def _jpeg(path: Path, size=(40, 30), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path, quality=95)


def test_resolve_classes(tmp_path):
    assert resolve_classes(tmp_path) == VOC_CLASSES
    assert resolve_classes(tmp_path, ["b", "a"]) == ("b", "a")
    (tmp_path / "classes.txt").write_text("cat\n\n dog \n")
    assert resolve_classes(tmp_path) == ("cat", "dog")
    assert resolve_classes(tmp_path, ["x"]) == ("x",)
    with pytest.raises(VocError, match="duplicate"):
        resolve_classes(tmp_path, ["a", "a"])


def test_classes_txt_is_used_and_digested(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [_object_xml("dog", (1, 1, 10, 10))])}, "cat\ndog\n")
    _jpeg(root / "JPEGImages" / "a.jpg")
    ds = VocDataset(root, "all")
    assert ds.classes == ("cat", "dog")
    np.testing.assert_array_equal(ds.ground_truth("a").labels, [1])
    assert root / "classes.txt" in ds.external_files()
    assert root / "classes.txt" not in VocDataset(root, "all", ["dog"]).external_files()


def test_blank_lines_and_extra_columns_in_split(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [])})
    (root / "ImageSets/Main/all.txt").write_text("\n  \na  1\n\nb\n")
    assert VocDataset(root, "all", ["cat"], missing_annotations="empty").ids == ("a", "b")


def test_filename_extension_disagrees_with_disk(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", []), "b": _xml("b.jpg", []), "c": _xml("c.png", [])})
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "JPEGImages" / "a.PNG")
    _jpeg(root / "JPEGImages" / "b.JPEG")
    _jpeg(root / "JPEGImages" / "c.jpg")
    ds = VocDataset(root, "all", ["cat"])
    assert ds.image_path("a") == root / "JPEGImages" / "a.PNG"
    assert ds.image_path("b") == root / "JPEGImages" / "b.JPEG"
    assert ds.image_path("c") == root / "JPEGImages" / "c.jpg"
    np.testing.assert_array_equal(ds.load_image("a")[0, 0], [1, 2, 3])


def test_extra_xml_fields_are_ignored(tmp_path):
    obj = _object_xml("cat", (2, 3, 20, 25), difficult=1, truncated=1,
                      extra="<attributes><attribute><name>x</name></attribute></attributes><occluded>1</occluded>")
    xml = _xml("a.jpg", [obj], extra="<path>/somewhere/a.jpg</path><source><database>Unknown</database></source>"
                                     "<segmented>0</segmented><owner><name>me</name></owner>")
    root = _devkit(tmp_path / "kit", {"a": xml})
    _jpeg(root / "JPEGImages" / "a.jpg")
    ann = VocDataset(root, "all", ["cat"]).annotation("a")
    assert ann == VocAnnotation("a", 40, 30, (VocObject("cat", (1.0, 2.0, 20.0, 25.0), True, True),))


def _modes():
    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 120, 240
    palette_image = Image.new("P", (40, 30), 3)
    palette_image.putpalette([0, 0, 0] * 3 + [9, 99, 199] + [0, 0, 0] * 252)
    grey16 = Image.fromarray(np.full((30, 40), 257 * 100, dtype=np.uint16))
    return [
        ("l.png", Image.new("L", (40, 30), 77), (77, 77, 77)),
        ("p.png", palette_image, (9, 99, 199)),
        ("rgba.png", Image.fromarray(np.dstack([rgb, np.full((30, 40), 5, np.uint8)]), "RGBA"), (10, 120, 240)),
        ("la.png", Image.new("LA", (40, 30), (50, 0)), (50, 50, 50)),
        ("bw.png", Image.new("1", (40, 30), 1), (255, 255, 255)),
        ("i16.png", grey16, (100, 100, 100)),
        ("cmyk.jpg", Image.new("CMYK", (40, 30), (0, 0, 0, 0)), (255, 255, 255)),
        ("grey.jpg", Image.new("L", (40, 30), 200), (200, 200, 200)),
    ]


def test_any_image_mode_becomes_rgb(tmp_path):
    modes = _modes()
    ids = [name.replace(".", "_") for name, _, _ in modes]
    root = _devkit(tmp_path / "kit", {i: _xml(n, []) for i, (n, _, _) in zip(ids, modes)})
    for image_id, (name, image, _) in zip(ids, modes):
        image.save(root / "JPEGImages" / f"{image_id}{Path(name).suffix}")
    ds = VocDataset(root, "all", ["cat"])
    for image_id, (name, image, expected) in zip(ids, modes):
        pixels = ds.load_image(image_id)
        assert pixels.dtype == np.uint8 and pixels.shape == (30, 40, 3), name
        tolerance = 3 if name.endswith(".jpg") else 0
        assert np.abs(pixels.astype(int) - expected).max() <= tolerance, (name, pixels[0, 0])


def test_exif_orientation_is_not_applied(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [_object_xml("cat", (1, 1, 10, 5))], size=None)})
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white: a rotation would move it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(image).save(root / "JPEGImages" / "a.jpg", exif=exif, quality=95)
    ds = VocDataset(root, "all", ["cat"])
    pixels = ds.load_image("a")
    assert pixels.shape == (30, 40, 3)
    assert pixels[:, :15].min() > 200 and pixels[:, 25:].max() < 50
    assert (ds.annotation("a").width, ds.annotation("a").height) == (40, 30)  # size from the stored grid


def test_box_partly_outside_is_clipped_with_warning(tmp_path, caplog):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [_object_xml("cat", (0, 5, 45, 30))])})
    _jpeg(root / "JPEGImages" / "a.jpg")
    ds = VocDataset(root, "all", ["cat"])
    gt = ds.ground_truth("a")
    assert _data_messages(caplog) == [
        "all: 1 boxes touch the image border at 0 (0-based coordinates?); clipped: a.xml"]
    np.testing.assert_array_equal(gt.boxes, [[0, 4, 40, 30]])


def test_zero_area_box_is_dropped_with_warning(tmp_path, caplog):
    objects = [_object_xml("cat", (50, 5, 60, 20)),   # entirely right of the 40-wide image
               _object_xml("cat", (45, 9, 50, 20)),   # also outside
               _object_xml("cat", (3, 3, 3, 3))]      # one pixel: kept
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", objects)})
    _jpeg(root / "JPEGImages" / "a.jpg")
    ds = VocDataset(root, "all", ["cat"])
    gt = ds.ground_truth("a")
    assert _data_messages(caplog) == ["all: 2 boxes have no area inside the image; dropped: a.xml"]
    np.testing.assert_array_equal(gt.boxes, [[2, 2, 3, 3]])


def test_unknown_names_one_warning_per_dataset(tmp_path, caplog):
    root = _devkit(tmp_path / "kit", {
        "a": _xml("a.jpg", [_object_xml("cat", (1, 1, 9, 9)), _object_xml("dog", (1, 1, 9, 9)),
                            _object_xml("cow", (2, 2, 9, 9))]),
        "b": _xml("b.jpg", [_object_xml("dog", (1, 1, 9, 9))]),
    })
    ds = VocDataset(root, "all", ["cat"])
    gts = [ds.ground_truth("a"), ds.ground_truth("b"), ds.ground_truth("a")]
    messages = _data_messages(caplog)
    assert len(messages) == 1 and "'cow': 1" in messages[0] and "'dog': 2" in messages[0]
    assert [len(g) for g in gts] == [1, 0, 1]
    assert len(ds.annotation("a").objects) == 3  # annotations keep every name


def test_missing_size_is_read_from_image(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [_object_xml("cat", (1, 1, 60, 20))], size=None),
                                      "b": _xml("b.jpg", [], extra="<size><width></width><height>0</height></size>")})
    _jpeg(root / "JPEGImages" / "a.jpg", size=(64, 48))
    _jpeg(root / "JPEGImages" / "b.jpg", size=(17, 13))
    ds = VocDataset(root, "all", ["cat"])
    ann = ds.annotation("a")
    assert (ann.width, ann.height) == (64, 48) and ann.objects[0].box == (0.0, 0.0, 60.0, 20.0)
    assert (ds.annotation("b").width, ds.annotation("b").height) == (17, 13)


def test_float_coordinates_and_flag_spellings(tmp_path):
    obj = _object_xml("cat", ("2.5", "3.0", "20.5", "25"), difficult="true", truncated="0")
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [obj, "<object><name>cat</name><bndbox><xmin>1</xmin>"
                                                       "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"])})
    ann = VocDataset(root, "all", ["cat"]).annotation("a")
    assert ann.objects[0] == VocObject("cat", (1.5, 2.0, 20.5, 25.0), True, False)
    assert ann.objects[1] == VocObject("cat", (0.0, 0.0, 5.0, 5.0), False, False)  # absent flags are 0


# ---------------------------------------------------------------------------------------------
# errors name the file


def test_missing_image(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [])})
    ds = VocDataset(root, "all", ["cat"])
    with pytest.raises(VocError, match=r"JPEGImages/a\.jpg.*not found"):
        ds.load_image("a")


def test_missing_annotation(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": None})
    with pytest.raises(VocError, match=r"all\.txt: 1 of 1 images have no annotation file in .*Annotations: a; "):
        VocDataset(root, "all", ["cat"])


def test_missing_image_set(tmp_path):
    root = _devkit(tmp_path / "kit", {})
    with pytest.raises(VocError, match=r"ImageSets/Main/nope\.txt"):
        VocDataset(root, "nope", ["cat"])


def test_malformed_xml(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": "<annotation><object><name>cat</name></annotation>"})
    with pytest.raises(VocError, match=r"a\.xml: malformed XML"):
        VocDataset(root, "all", ["cat"]).annotation("a")


@pytest.mark.parametrize("box", [(1, 2, 3, None), (1, "x", 3, 4)])
def test_missing_or_bad_bndbox_coordinate(tmp_path, box):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [_object_xml("cat", box)])})
    with pytest.raises(VocError, match=r"a\.xml: object 1 \(cat\)"):
        VocDataset(root, "all", ["cat"]).annotation("a")


def test_missing_bndbox_element(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", ["<object><name>cat</name></object>"])})
    with pytest.raises(VocError, match=r"a\.xml: .*<xmin>"):
        VocDataset(root, "all", ["cat"]).annotation("a")


@pytest.mark.parametrize("bad_id", ["../a", "sub/a", "..", "/etc/passwd", "a\\b", "a..b", "C:a"])
def test_ids_never_escape_the_devkit(tmp_path, bad_id):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", [])})
    (root / "ImageSets/Main/bad.txt").write_text(f"a\n{bad_id}\n")
    with pytest.raises(VocError, match=r"bad\.txt:2"):
        VocDataset(root, "bad", ["cat"])
    ds = VocDataset(root, "all", ["cat"])
    for call in (ds.image_path, ds.annotation, ds.load_image):
        with pytest.raises(VocError, match="not a plain file name"):
            call(bad_id)
    with pytest.raises(VocError):
        write_image_set(root, "x", ["a", bad_id])


def test_corrupt_image(tmp_path):
    root = _devkit(tmp_path / "kit", {"a": _xml("a.jpg", []), "b": _xml("b.jpg", [], size=None)})
    good = tmp_path / "good.jpg"
    _jpeg(good, size=(64, 48))
    (root / "JPEGImages" / "a.jpg").write_bytes(good.read_bytes()[:200])  # truncated JPEG
    (root / "JPEGImages" / "b.jpg").write_bytes(b"not an image at all")
    ds = VocDataset(root, "all", ["cat"])
    with pytest.raises(VocError, match=r"JPEGImages/a\.jpg: cannot decode"):
        ds.load_image("a")
    with pytest.raises(VocError, match=r"JPEGImages/b\.jpg"):
        ds.load_image("b")
    with pytest.raises(VocError, match=r"JPEGImages/b\.jpg"):
        ds.annotation("b")  # no <size>: the size comes from the unreadable image


# ---------------------------------------------------------------------------------------------
# writer


def test_written_xml_has_devkit_fields(tmp_path):
    ann = VocAnnotation("x", 50, 40, (VocObject("cat", (0.0, 4.0, 50.0, 40.0), True, False),
                                      VocObject("dog", (9.5, 1.0, 12.25, 3.0), False, True)))
    path = tmp_path / "Annotations" / "x.xml"
    write_annotation(path, ann, "x.jpg")
    text = path.read_text()
    for fragment in ("<filename>x.jpg</filename>", "<width>50</width>", "<height>40</height>",
                     "<depth>3</depth>", "<xmin>1</xmin>", "<ymin>5</ymin>", "<xmax>50</xmax>",
                     "<ymax>40</ymax>", "<difficult>1</difficult>", "<truncated>1</truncated>",
                     "<xmin>10.50</xmin>", "<xmax>12.25</xmax>"):
        assert fragment in text, fragment
    write_image_set(tmp_path, "s", ["x"])
    assert VocDataset(tmp_path, "s", ["cat", "dog"]).annotation("x") == ann
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.xml"]


def test_class_image_sets_hand_worked(tmp_path):
    box = (0.0, 0.0, 5.0, 5.0)
    annotations = {
        "a": VocAnnotation("a", 9, 9, (VocObject("cat", box), VocObject("cat", box, difficult=True))),
        "b": VocAnnotation("b", 9, 9, (VocObject("cat", box, difficult=True), VocObject("dog", box))),
        "c": VocAnnotation("c", 9, 9, ()),
    }
    paths = write_class_image_sets(tmp_path, "train", ["c", "a", "b"], annotations, ["cat", "dog"])
    assert [p.name for p in paths] == ["cat_train.txt", "dog_train.txt"]
    assert (tmp_path / "ImageSets/Main/cat_train.txt").read_text() == "c -1\na  1\nb  0\n"
    assert (tmp_path / "ImageSets/Main/dog_train.txt").read_text() == "c -1\na -1\nb  1\n"
    assert [class_presence(annotations[i], "cat") for i in "abc"] == [1, 0, -1]
