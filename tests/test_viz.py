"""Drawing detections and plotting PR curves produce valid PNGs with the right pixels."""
import numpy as np
import pytest
from PIL import Image

from sppcli.viz import BOX_LINE_WIDTH, class_color, draw_detections, plot_pr_curves, save_png

CLASSES = ["aeroplane", "bicycle", "bird"]


def test_box_edges_have_the_class_colour_and_inside_stays_untouched(tmp_path):
    image = np.full((120, 160, 3), 128, dtype=np.uint8)
    boxes = np.array([[20.0, 40.0, 80.0, 100.0], [100.0, 30.0, 150.0, 90.0]])
    labels = np.array([0, 2])
    canvas = draw_detections(image, boxes, labels, np.array([0.87, 0.5]), CLASSES)
    pixels = np.asarray(canvas)
    assert pixels.shape == image.shape
    for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels):
        color = class_color(label)
        # Every pixel of the outline band along the left, right and bottom edges.
        mid_y = slice(y1 + BOX_LINE_WIDTH, y2 - BOX_LINE_WIDTH)
        assert (pixels[mid_y, x1 : x1 + BOX_LINE_WIDTH] == color).all()
        assert (pixels[mid_y, x2 - BOX_LINE_WIDTH : x2] == color).all()
        assert (pixels[y2 - BOX_LINE_WIDTH : y2, x1 + 5 : x2 - 5] == color).all()
        # The box interior away from the tag and the pixels just outside stay grey.
        assert (pixels[y2 - 10, x1 + BOX_LINE_WIDTH + 2 : x2 - BOX_LINE_WIDTH - 2] == 128).all()
        assert (pixels[mid_y, x1 - 1] == 128).all() and (pixels[mid_y, x2] == 128).all()
    assert class_color(0) != class_color(2)
    # The tag sits above the first box and is filled with its colour.
    assert (pixels[40 - 3, 20:22] == class_color(0)).all()
    np.testing.assert_array_equal(image, 128)  # input untouched

    path = save_png(canvas, tmp_path / "sub" / "det.png")
    with Image.open(path) as reread:
        assert reread.format == "PNG" and reread.size == (160, 120)
        np.testing.assert_array_equal(np.asarray(reread.convert("RGB")), pixels)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["det.png"]  # no temporary left


def test_score_threshold_is_strict_and_bad_input_is_rejected():
    image = np.zeros((50, 50, 3), dtype=np.uint8)
    canvas = draw_detections(image, [[10, 10, 40, 40]], [1], [0.0], CLASSES, score_threshold=0.0)
    assert not np.asarray(canvas).any()
    canvas = draw_detections(image, [[10, 10, 40, 40]], [1], [0.01], CLASSES)
    assert (np.asarray(canvas)[20, 10] == class_color(1)).all()
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(image.astype(np.float32), [[0, 0, 1, 1]], [0], [1.0], CLASSES)
    with pytest.raises(ValueError, match="labels"):
        draw_detections(image, [[0, 0, 1, 1]], [3], [1.0], CLASSES)


def test_boxes_past_the_border_are_clipped():
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    canvas = np.asarray(draw_detections(image, [[-5.0, -5.0, 60.0, 60.0]], [0], [0.9], CLASSES))
    color = class_color(0)
    assert (canvas[15, 0] == color).all() and (canvas[15, 39] == color).all()
    assert (canvas[29, 20] == color).all()


def test_pr_curve_png_is_written_and_shows_the_curves(tmp_path):
    results = {
        "cat": (np.array([0.2, 0.4, 0.6]), np.array([1.0, 0.9, 0.6]), 0.55),
        "dog": (np.array([0.0, 0.5, 0.5]), np.array([np.nan, 0.5, 0.3]), 0.25),
    }
    path = plot_pr_curves(results, tmp_path / "pr.png", title="VOC 2007 test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 600)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # Curves are drawn in saturated colours; a blank plot is only greys and white.
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert (saturation > 100).sum() > 200
    empty = plot_pr_curves({}, tmp_path / "empty.png")
    with Image.open(empty) as image:
        empty_pixels = np.asarray(image.convert("RGB")).astype(int)
    assert ((empty_pixels.max(axis=-1) - empty_pixels.min(axis=-1)) > 100).sum() == 0
