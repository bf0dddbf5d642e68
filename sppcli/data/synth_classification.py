"""Folder-per-class sets of synthetic shape crops: analogs of ImageNet and Caltech101 for the embedded data.

The paper pretrains on ImageNet (1000 classes) and detects VOC's 20, a superset being what makes
the features general. ``kind = "classification"`` is that superset for the embedded detection
set: its 8 classes, drawn by the same shape painters as :mod:`sppcli.data.synth`, plus shape,
texture and letter classes that never appear in a detection image. ``kind = "caltech"`` holds
classes disjoint from both, for Table 4's protocol (a set the pretraining never saw).

Each crop shows one object near the centre, with varied scale, aspect, rotation, partial
occlusion and clutter, on a procedural background (noise, gradients, blobs) or a crop of the
photos scikit-learn ships; colour never identifies a class (one palette for all). Every crop is a
pure function of ``(seed, kind, class name, index, size)``, so the same arguments give
byte-identical files and adding a class changes no other class's crops.
"""
from __future__ import annotations

import io
import math
import time
import zlib
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from sppcli.artifacts import atomic_write_bytes
from sppcli.data import synth

DETECTION_CLASSES: tuple[str, ...] = synth.CLASS_NAMES
_POLYGON_SIDES = {"square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
_LETTERS = ("A", "E", "K", "M", "R", "S", "X", "Z")
EXTRA_CLASSES: tuple[str, ...] = (
    *_POLYGON_SIDES, "arrow", "double_arrow", "heart", "spoked_ring", "gear", "frame", "chevron",
    "semicircle", "hourglass", "teardrop", "tee", "ell",
    "dots", "zigzag", "gradient", "waves", "grid", "diagonal", "concentric", "pinwheel",
    *(f"letter_{c}" for c in _LETTERS),
)
CALTECH_CLASSES: tuple[str, ...] = (
    "heptagon", "trefoil", "bowtie", "house", "lightning", "crosshatch", "bullseye_dots",
    "letter_B", "letter_G", "letter_H", "letter_W", "digit_2", "digit_5", "digit_7",
)
KINDS: dict[str, tuple[str, ...]] = {
    "classification": DETECTION_CLASSES + EXTRA_CLASSES,
    "caltech": CALTECH_CLASSES,
}
JPEG_QUALITY = 90

_CANON = 256      # the canonical frame [-1, 1]^2 is drawn at this many pixels a side
_OVERSAMPLE = 2   # crops are composed at 2x and reduced by area averaging (anti-aliasing)
_TEXTURED = {"stripes", "checker", "dots", "zigzag", "gradient", "waves", "grid", "diagonal",
             "concentric", "pinwheel", "crosshatch", "bullseye_dots"}
_UPRIGHT = {"house", "heart", "teardrop", "tee", "ell", "arrow"}  # these keep within +-0.6 rad
_KIND_IDS = {"classification": 1, "caltech": 2}


def crop_rng(seed: int, kind: str, name: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(seed), _KIND_IDS[kind], zlib.crc32(name.encode()),
                                                int(index)]))


# ---------------------------------------------------------------------------------------------
# shapes in the canonical frame: uint8 [C, C] coverage, 255 inside


def _to_canon(points: np.ndarray) -> np.ndarray:
    return (np.asarray(points, dtype=np.float64) + 1.0) * (_CANON / 2.0)


def _fill(points, canvas: np.ndarray | None = None, value: int = 255) -> np.ndarray:
    canvas = np.zeros((_CANON, _CANON), np.uint8) if canvas is None else canvas
    pts = np.round(_to_canon(points) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(canvas, [pts], value, lineType=cv2.LINE_AA, shift=4)
    return canvas


def _regular(k: int, rng: np.random.Generator, radius: float = 1.0) -> np.ndarray:
    angles = np.pi / 2 + np.arange(k) * 2 * np.pi / k + rng.uniform(-0.08, 0.08, k)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _disc(radius: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    return synth._circle(radius, cx, cy)


def _glyph(text: str, rng: np.random.Generator) -> np.ndarray:
    font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX)[int(rng.integers(3))]
    thickness = int(rng.integers(3, 6))
    (w, h), base = cv2.getTextSize(text, font, 4.0, thickness)
    canvas = np.zeros((h + base + 2 * thickness, w + 2 * thickness), np.uint8)
    cv2.putText(canvas, text, (thickness, h + thickness), font, 4.0, 255, thickness, cv2.LINE_AA)
    ys, xs = np.nonzero(canvas)
    glyph = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return cv2.resize(glyph, (_CANON, _CANON), interpolation=cv2.INTER_AREA)  # fills the frame


def _silhouette(rng: np.random.Generator) -> np.ndarray:
    """The outline of a texture class: square, disc or rounded blob (the texture is the class)."""
    choice = int(rng.integers(3))
    if choice == 0:
        return _fill(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64))
    if choice == 1:
        return _fill(_disc(1.0))
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = 0.85 + sum(rng.uniform(0.03, 0.08) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    return _fill(np.stack([r * np.cos(t), r * np.sin(t)], axis=1))


def shape_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[C, C]`` coverage of class ``name`` in the canonical frame."""
    if name in DETECTION_CLASSES:
        # the detection set's own painter, so both sets show the same objects
        mask = np.zeros((_CANON, _CANON), dtype=bool)
        for polygon, adds in synth._shape_layers(name, rng):
            inside = synth._fill_polygon(_to_canon(polygon), _CANON, _CANON)
            mask = mask | inside if adds else mask & ~inside
        return mask.astype(np.uint8) * 255
    if name in _TEXTURED:
        return _silhouette(rng)
    if name.startswith(("letter_", "digit_")):
        return _glyph(name.split("_", 1)[1], rng)
    if name in _POLYGON_SIDES or name == "heptagon":
        return _fill(_regular(_POLYGON_SIDES.get(name, 7), rng))
    if name == "arrow":
        shaft, head = rng.uniform(0.18, 0.32), rng.uniform(-0.1, 0.25)
        return _fill(np.array([(-1, -shaft), (head, -shaft), (head, -0.9), (1, 0), (head, 0.9),
                               (head, shaft), (-1, shaft)]))
    if name == "double_arrow":
        s, h = rng.uniform(0.15, 0.28), rng.uniform(0.35, 0.55)
        return _fill(np.array([(-1, 0), (-h, -0.9), (-h, -s), (h, -s), (h, -0.9), (1, 0), (h, 0.9),
                               (h, s), (-h, s), (-h, 0.9)]))
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return _fill(np.stack([x / 17, (y + 2.5) / 15], axis=1))
    if name == "spoked_ring":
        mask = _fill(_disc(1.0))
        _fill(_disc(rng.uniform(0.72, 0.82)), mask, 0)
        spokes, width = int(rng.integers(3, 7)), int(rng.uniform(0.08, 0.14) * _CANON / 2)
        centre = (_CANON // 2, _CANON // 2)
        for k in range(spokes):
            a = k * np.pi / spokes * 2 + rng.uniform(0, 0.2)
            end = (int(centre[0] + 0.9 * _CANON / 2 * math.cos(a)), int(centre[1] + 0.9 * _CANON / 2 * math.sin(a)))
            cv2.line(mask, centre, end, 255, width, cv2.LINE_AA)
        return mask
    if name == "gear":
        teeth = int(rng.integers(8, 13))
        angles = np.linspace(0, 2 * np.pi, teeth * 4, endpoint=False)
        radii = np.tile([1.0, 1.0, 0.78, 0.78], teeth)
        mask = _fill(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))
        return _fill(_disc(rng.uniform(0.2, 0.35)), mask, 0)
    if name == "frame":
        mask = _fill(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64))
        t = rng.uniform(0.55, 0.75)
        return _fill(np.array([(-t, -t), (t, -t), (t, t), (-t, t)]), mask, 0)
    if name == "chevron":
        t = rng.uniform(0.35, 0.55)
        return _fill(np.array([(-1, -1), (-1 + t, -1), (1, 0), (-1 + t, 1), (-1, 1), (1 - 2 * t + t, 0)]))
    if name == "semicircle":
        t = np.linspace(0, np.pi, 48)
        return _fill(np.stack([np.cos(t), 1 - 2 * np.sin(t)], axis=1))
    if name == "hourglass":
        w = rng.uniform(0.1, 0.25)
        return _fill(np.array([(-1, -1), (1, -1), (w, 0), (1, 1), (-1, 1), (-w, 0)]))
    if name == "bowtie":
        h = rng.uniform(0.1, 0.25)
        return _fill(np.array([(-1, -1), (0, -h), (1, -1), (1, 1), (0, h), (-1, 1)]))
    if name == "teardrop":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x, y = np.sin(t) * np.sin(t / 2) ** 1.5, -np.cos(t)
        return _fill(np.stack([x / np.abs(x).max(), y], axis=1))
    if name == "tee":
        t = rng.uniform(0.2, 0.32)
        return _fill(np.array([(-1, -1), (1, -1), (1, -1 + 2 * t), (t, -1 + 2 * t), (t, 1), (-t, 1),
                               (-t, -1 + 2 * t), (-1, -1 + 2 * t)]))
    if name == "ell":
        t = rng.uniform(0.3, 0.45)
        return _fill(np.array([(-1, -1), (-1 + 2 * t, -1), (-1 + 2 * t, 1 - 2 * t), (1, 1 - 2 * t), (1, 1), (-1, 1)]))
    if name == "trefoil":
        mask = np.zeros((_CANON, _CANON), np.uint8)
        r = rng.uniform(0.42, 0.5)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            _fill(_disc(r, (1 - r) * math.cos(a), (1 - r) * math.sin(a)), mask)
        return mask
    if name == "house":
        e = rng.uniform(-0.2, 0.1)
        return _fill(np.array([(-0.8, 1), (0.8, 1), (0.8, e), (1, e), (0, -1), (-1, e), (-0.8, e)]))
    if name == "lightning":
        return _fill(np.array([(0.1, -1), (0.8, -1), (0.2, -0.15), (0.7, -0.15), (-0.5, 1), (-0.1, 0.1),
                               (-0.6, 0.1)]))
    raise ValueError(f"unknown synthetic classification class {name!r}")


def texture(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float ``[H, W]`` in [0, 1]: the share of the second colour at canonical points ``(u, v)``."""
    if name == "stripes":  # as the detection set draws them
        cells = rng.integers(3, 7)
        return (np.floor((u + 1) * cells).astype(np.int64) % 2 == 1).astype(np.float32)
    if name == "checker":
        cells = rng.integers(2, 4)
        return ((np.floor((u + 1) * cells) + np.floor((v + 1) * cells)).astype(np.int64) % 2 == 1).astype(np.float32)
    if name not in _TEXTURED:
        return np.zeros(u.shape, np.float32)
    period = rng.uniform(0.35, 0.6)
    if name == "dots":
        gu, gv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return (gu ** 2 + gv ** 2 < rng.uniform(0.06, 0.12)).astype(np.float32)
    if name == "zigzag":
        return ((v + 0.4 * np.abs((u / period) % 2 - 1)) / period % 1 < 0.5).astype(np.float32)
    if name == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        return np.clip((u * math.cos(a) + v * math.sin(a) + 1) / 2, 0, 1).astype(np.float32)
    if name == "waves":
        return ((v + 0.15 * np.sin(u / period * 2 * np.pi)) / period % 1 < 0.5).astype(np.float32)
    if name == "grid":
        line = rng.uniform(0.12, 0.22)
        return (((u / period) % 1 < line) | ((v / period) % 1 < line)).astype(np.float32)
    if name == "diagonal":
        return (((u + v) / period) % 1 < 0.5).astype(np.float32)
    if name == "crosshatch":
        line = rng.uniform(0.15, 0.25)
        return ((((u + v) / period) % 1 < line) | (((u - v) / period) % 1 < line)).astype(np.float32)
    if name == "concentric":
        return ((np.hypot(u, v) / (period * 0.6)) % 1 < 0.5).astype(np.float32)
    if name == "bullseye_dots":
        r = np.hypot(u, v)
        ring = (r / (period * 0.7)) % 1
        a = np.arctan2(v, u) * np.maximum(np.round(r / (period * 0.7)), 1) * 3
        return ((np.abs(ring - 0.5) < 0.25) & (np.cos(a) > 0.2)).astype(np.float32)
    if name == "pinwheel":
        sectors = int(rng.integers(3, 7))
        return ((np.arctan2(v, u) / np.pi * sectors) % 2 < 1).astype(np.float32)
    raise ValueError(f"no texture for {name!r}")


# ---------------------------------------------------------------------------------------------
# backgrounds, occluders, one crop


def _procedural_background(rng: np.random.Generator, side: int) -> Image.Image:
    choice = int(rng.integers(3))
    if choice == 0:  # smooth multi-octave noise
        pixels = np.zeros((side, side, 3), np.float32)
        for cells, weight in ((3, 1.0), (8, 0.5), (20, 0.25)):
            low = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
            pixels += weight * cv2.resize(low, (side, side), interpolation=cv2.INTER_CUBIC)
        pixels = 128 + pixels * rng.uniform(30, 60) + rng.uniform(-40, 40, 3)
    elif choice == 1:  # linear gradient between two palette colours
        a = rng.uniform(0, 2 * np.pi)
        coords = np.linspace(-1, 1, side, dtype=np.float32)
        t = np.clip((coords[None, :] * math.cos(a) + coords[:, None] * math.sin(a) + 1.4) / 2.8, 0, 1)
        first, second = synth._palette_colour(rng), synth._palette_colour(rng)
        pixels = (first * (1 - t[..., None]) + second * t[..., None]).astype(np.float32)
    else:  # flat colour with soft blobs
        pixels = np.ones((side, side, 3), np.float32) * (synth._palette_colour(rng) * rng.uniform(0.5, 1.0))
        for _ in range(int(rng.integers(2, 7))):
            centre = tuple(int(c) for c in rng.uniform(0, side, 2))
            axes = tuple(int(c) for c in rng.uniform(0.05, 0.35, 2) * side)
            colour = tuple(float(c) for c in synth._palette_colour(rng))
            cv2.ellipse(pixels, centre, axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
        pixels = cv2.GaussianBlur(pixels, (0, 0), side * 0.03)  # soft blobs, not shapes
    pixels = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(0, 12)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    synth._draw_clutter(image, rng)
    return image


def _occlude(canvas: np.ndarray, rng: np.random.Generator, centre: tuple[float, float], radius: float) -> None:
    """A clutter shape over part of the object: a rim of it, never its centre."""
    a = rng.uniform(0, 2 * np.pi)
    dist = radius * rng.uniform(0.9, 1.3)
    cx, cy = centre[0] + dist * math.cos(a), centre[1] + dist * math.sin(a)
    axes = (int(radius * rng.uniform(0.4, 0.7)), int(radius * rng.uniform(0.3, 0.7)))
    colour = tuple(float(c) for c in synth._palette_colour(rng))
    if rng.random() < 0.5:
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
    else:
        box = cv2.boxPoints(((cx, cy), (2.0 * axes[0], 2.0 * axes[1]), rng.uniform(0, 180)))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], colour, cv2.LINE_AA)


def render_crop(seed: int, kind: str, name: str, index: int, size: int = 80) -> np.ndarray:
    """uint8 ``[size, size, 3]`` RGB: crop ``index`` of class ``name`` in set ``kind``."""
    rng = crop_rng(seed, kind, name, index)
    side = size * _OVERSAMPLE
    if rng.random() < 0.35:
        background = synth._background(rng, side, side)  # photos plus the detection set's clutter
    else:
        background = _procedural_background(rng, side)
    canvas = np.asarray(background, dtype=np.float32).copy()

    coverage = shape_mask(name, rng)
    # where the canonical frame lands: the object's longer side spans 40-95% of the crop, off centre
    extent = side * math.exp(rng.uniform(math.log(0.4), math.log(0.95))) / 2
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.65)))
    half_w, half_h = extent * min(1.0, aspect), extent * min(1.0, 1 / aspect)
    spread = 0.6 if name in _UPRIGHT or name.startswith(("letter_", "digit_")) else math.pi
    angle = rng.uniform(-spread, spread)
    cx, cy = side / 2 + rng.uniform(-0.15, 0.15, 2) * side
    c, s = math.cos(angle), math.sin(angle)
    scale_x, scale_y = 2 * half_w / _CANON, 2 * half_h / _CANON
    # canonical pixel (p, q) -> crop pixel: centre + R @ diag(scale) @ ((p, q) - C / 2)
    forward = np.array([[c * scale_x, -s * scale_y, 0.0], [s * scale_x, c * scale_y, 0.0]])
    forward[:, 2] = (cx, cy) - forward[:, :2] @ (_CANON / 2, _CANON / 2)
    alpha = cv2.warpAffine(coverage.astype(np.float32) / 255, forward, (side, side), flags=cv2.INTER_LINEAR)

    behind = canvas[alpha > 0.5].mean(axis=0) if (alpha > 0.5).any() else canvas.reshape(-1, 3).mean(axis=0)
    colours = synth._pick_colours(name, behind, rng, two_colours=name in _TEXTURED)
    inverse = cv2.invertAffineTransform(forward).astype(np.float32)
    pixel = np.arange(side, dtype=np.float32) + 0.5
    u = (inverse[0, 0] * pixel[None, :] + inverse[0, 1] * pixel[:, None] + inverse[0, 2]) / (_CANON / 2) - 1
    v = (inverse[1, 0] * pixel[None, :] + inverse[1, 1] * pixel[:, None] + inverse[1, 2]) / (_CANON / 2) - 1
    light = rng.uniform(0, 2 * np.pi)
    shade = (1.0 + rng.uniform(0.0, 0.18) * (u * math.cos(light) + v * math.sin(light)))[..., None]
    if name in _TEXTURED:
        second = texture(name, u, v, rng)[..., None]
        rgb = (colours[0] * (1 - second) + colours[1] * second) * shade
    else:
        rgb = colours[0] * shade
    weight = alpha[..., None]
    canvas = canvas * (1 - weight) + rgb * weight

    if rng.random() < 0.3:
        _occlude(canvas, rng, (cx, cy), extent)
    small = cv2.resize(np.clip(canvas, 0, 255), (size, size), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), rng.uniform(0.3, 0.7))
    small = small + rng.standard_normal(small.shape, dtype=np.float32) * rng.uniform(1.5, 4.0)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the folder


def make_classification_set(out: Path, kind: str = "classification", seed: int = 0, per_class: int = 150,
                            size: int = 80, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``out/<class>/<index>.jpg`` for every class of ``KINDS[kind]``, ``per_class`` each.

    Every file is written atomically; callers that need an all-or-nothing folder generate into a
    temporary one and rename it (as ``sppcli make-dataset`` does).

    Returns:
        summary: ``kind``, ``seed``, ``size``, ``per_class``, ``classes``, ``images``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown classification set {kind!r}; expected one of {', '.join(KINDS)}")
    seed, per_class, size = int(seed), int(per_class), int(size)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if per_class < 1:
        raise ValueError(f"need at least one image per class, got {per_class}")
    if size < 16:
        raise ValueError(f"crops must be at least 16 pixels a side, got {size}")
    started = time.perf_counter()
    classes = KINDS[kind]
    total, done = len(classes) * per_class, 0
    for name in classes:
        for index in range(per_class):
            buffer = io.BytesIO()
            Image.fromarray(render_crop(seed, kind, name, index, size)).save(buffer, format="JPEG",
                                                                              quality=JPEG_QUALITY)
            atomic_write_bytes(Path(out) / name / f"{index + 1:05d}.jpg", buffer.getvalue())
            done += 1
            if progress is not None:
                progress(done, total)
    return {"kind": kind, "seed": seed, "size": size, "per_class": per_class, "classes": list(classes),
            "images": total, "seconds": round(time.perf_counter() - started, 3)}
