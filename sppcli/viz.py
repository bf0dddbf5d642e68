"""Pictures for people: detections drawn on images (like the paper's Figure 6) and PR curves.

Drawing uses PIL. Plots use matplotlib's object-oriented API on an Agg canvas, imported inside
the plotting function, so importing this module neither loads matplotlib nor touches pyplot's
global state or the user's backend.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sppcli.artifacts import atomic_path

BOX_LINE_WIDTH = 3
_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for class index ``label`` (int >= 0), fixed across images.

    Hues step by the golden ratio so that neighbouring class indices get far-apart colours
    for any number of classes.
    """
    hue = (int(label) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = 0.0,
) -> Image.Image:
    """Draw scored detections on a copy of an image.

    image (uint8[H, W, 3]): RGB pixels.
    boxes (float[N, 4]): (x1, y1, x2, y2), internal continuous pixel-edge convention; the
        outline is drawn on the pixels just inside the box, ``BOX_LINE_WIDTH`` pixels thick.
    labels (int[N]): indices into ``class_names``; the colour is ``class_color(label)``.
    scores (float[N]): a detection is drawn when its score > score_threshold (Figure 6 shows
        "all windows with scores > 0").
    Each box gets a filled tag in its colour reading "<class> <score:.2f>", above the box when it
    fits, else just inside its top edge. Higher scores are drawn last, i.e. on top.
    Returns a new RGB PIL image; the input array is not modified.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (len(boxes) == len(labels) == len(scores)):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must index class_names (0..{len(class_names) - 1})")

    canvas = Image.fromarray(image, mode="RGB")
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    font = _tag_font(min(height, width))
    shown = np.flatnonzero(scores > score_threshold)
    for index in shown[np.argsort(scores[shown], kind="stable")]:
        x1, y1, x2, y2 = boxes[index]
        # Pixel column i covers [i, i+1): the box's last covered column is ceil(x2) - 1.
        left = int(np.clip(np.floor(x1), 0, width - 1))
        top = int(np.clip(np.floor(y1), 0, height - 1))
        right = int(np.clip(np.ceil(x2) - 1, left, width - 1))
        bottom = int(np.clip(np.ceil(y2) - 1, top, height - 1))
        color = class_color(labels[index])
        draw.rectangle([left, top, right, bottom], outline=color, width=BOX_LINE_WIDTH)

        text = f"{class_names[labels[index]]} {scores[index]:.2f}"
        text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), text, font=font)
        tag_width = text_right - text_left + 4
        tag_height = text_bottom - text_top + 4
        tag_top = top - tag_height if top - tag_height >= 0 else top
        tag_left = min(left, max(0, width - tag_width))
        draw.rectangle([tag_left, tag_top, tag_left + tag_width - 1, tag_top + tag_height - 1], fill=color)
        draw.text((tag_left + 2 - text_left, tag_top + 2 - text_top), text, fill=_text_color(color), font=font)
    return canvas


def _tag_font(short_side: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # About 12 px text on a VOC-sized (500 x 375) image, readable on larger ones too.
    size = max(10, short_side // 30)
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def save_png(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write ``image`` (PIL image or uint8[H, W, 3] array) as PNG atomically; returns the path."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def plot_pr_curves(
    results: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Plot precision-recall curves, one per class, into one PNG (written atomically).

    results: class name -> (recall float[D], precision float[D], ap in [0, 1]), e.g. from
        ``voc_eval.ClassResult``. NaN precisions (no counted detection yet) leave gaps.
    The legend reads "<class> (AP 58.0)", classes in the given order. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colors = _distinct_plot_colors(len(results))
    for (class_name, (recall, precision, ap)), color in zip(results.items(), colors):
        recall = np.asarray(recall, dtype=np.float64)
        precision = np.asarray(precision, dtype=np.float64)
        axes.plot(recall, precision, color=color, linewidth=1.5, label=f"{class_name} (AP {100.0 * ap:.1f})")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    if results:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def _distinct_plot_colors(count: int) -> list[tuple[float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if count > 10 else colormaps["tab10"]
    return [cmap(i % cmap.N)[:3] for i in range(count)]
