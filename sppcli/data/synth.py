"""The embedded default dataset: a synthetic PASCAL VOC2007-format devkit of shapes on photos.

Eight classes that differ by shape and texture, never by colour: every instance draws its colours
from one shared palette. Objects are scaled anisotropically and rotated, areas span well over 8x,
several objects share an image (often two of a class side by side), later objects partly occlude
earlier ones, objects at the border are truncated, tiny ones are marked difficult, and the
backgrounds are random crops of real photographs with distractor clutter (lines, lumpy blobs,
noise patches) that belongs to no class.

Every image is a pure function of ``(seed, image index)`` (plus the image size and which class its
first object must have), so images can be generated in any order or in parallel and the same seed
gives byte-identical files.

Boxes follow the internal convention of :mod:`sppcli.data.voc` (0-based continuous pixel edges)
and are the tight box of the object's mask inside the image: occlusion by later objects does not
shrink a box, the image border does.
"""
from __future__ import annotations

import io
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sppcli.artifacts import atomic_write_bytes
from sppcli.data.voc import (VocAnnotation, VocObject, write_annotation, write_class_image_sets,
                             write_image_set)

CLASS_NAMES: tuple[str, ...] = (
    "disc", "ring", "triangle", "cross", "star", "crescent", "stripes", "checker",
)
class_names = CLASS_NAMES  # alias: the lower-case spelling is also in use

#: Objects whose visible box has a shorter side below this many pixels are marked difficult.
DIFFICULT_MIN_SIDE = 14
#: Objects with more than this fraction of their area outside the image are marked truncated.
TRUNCATED_OUTSIDE_FRACTION = 0.15
JPEG_QUALITY = 90

_SUPERSAMPLE = 4          # anti-aliasing: masks are drawn at 4x and averaged down
_BOX_COVERAGE = 0.25      # a pixel belongs to the tight box when the shape covers >= 1/4 of it
_MIN_VISIBLE_SHARE = 0.5  # a new object may not hide more than half of an earlier one
_MIN_INSIDE_SHARE = 0.45  # a truncated object keeps at least this share inside the image
_PLACEMENT_TRIES = 12

# One palette for every class (and for the clutter), so colour never identifies a class.
_PALETTE = np.array([
    (220, 40, 40), (40, 160, 60), (40, 80, 210), (235, 210, 40), (240, 130, 30), (140, 60, 180),
    (40, 200, 210), (220, 60, 170), (245, 245, 240), (25, 25, 30), (130, 130, 135), (130, 80, 40),
], dtype=np.float32)

_OBJECTS_PER_IMAGE = np.array([0.2, 0.3, 0.25, 0.15, 0.1])  # P(1), ..., P(5)


# ---------------------------------------------------------------------------------------------
# shapes: polygons in a canonical frame where the shape fills [-1, 1] x [-1, 1]


def _circle(radius: float, cx: float = 0.0, cy: float = 0.0, points: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _shape_layers(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    """``(polygon [K, 2], adds)`` pairs in the canonical frame, applied in order: a polygon with
    ``adds`` False cuts a hole (ring) or a bite (crescent) out of what came before."""
    if name == "disc":
        return [(_circle(1.0), True)]
    if name in ("stripes", "checker"):
        return [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64), True)]
    if name == "ring":
        return [(_circle(1.0), True), (_circle(rng.uniform(0.45, 0.65)), False)]
    if name == "crescent":
        offset, radius = rng.uniform(0.35, 0.6), rng.uniform(0.8, 0.95)
        return [(_circle(1.0), True), (_circle(radius, cx=offset), False)]
    if name == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.2, 0.2, 3)
        radii = rng.uniform(0.85, 1.0, 3)
        return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), True)]
    if name == "cross":
        t = rng.uniform(0.2, 0.36)
        outline = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t),
                   (-1, t), (-1, -t), (-t, -t)]
        return [(np.array(outline, dtype=np.float64), True)]
    if name == "star":
        spikes = int(rng.integers(5, 7))
        inner = rng.uniform(0.38, 0.5)
        angles = np.pi / 2 + np.arange(2 * spikes) * np.pi / spikes
        radii = np.where(np.arange(2 * spikes) % 2 == 0, 1.0, inner)
        return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), True)]
    raise ValueError(f"unknown synthetic class {name!r}")


# Anisotropy (width/height before rotation) and rotation range per class.
_ASPECT_RANGE = {"stripes": (0.4, 2.5), "checker": (0.75, 1.33)}
_DEFAULT_ASPECT_RANGE = (0.55, 1.8)
_ROTATION_RANGE = {"checker": 0.5, "cross": 0.6}  # radians either side; others rotate freely


class _Geometry:
    """Where an object lies: centre, half-extents of its canonical frame, rotation."""

    def __init__(self, cx: float, cy: float, half_w: float, half_h: float, angle: float):
        self.cx, self.cy, self.half_w, self.half_h, self.angle = cx, cy, half_w, half_h, angle
        c, s = abs(math.cos(angle)), abs(math.sin(angle))
        self.extent_x = half_w * c + half_h * s  # half-size of the rotated frame's bounding box
        self.extent_y = half_w * s + half_h * c

    def to_image(self, points: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = points[:, 0] * self.half_w, points[:, 1] * self.half_h
        return np.stack([self.cx + c * x - s * y, self.cy + s * x + c * y], axis=1)

    def patch(self) -> tuple[int, int, int, int]:
        """Integer pixel rectangle ``(x0, y0, width, height)`` that contains the whole shape."""
        x0, y0 = math.floor(self.cx - self.extent_x) - 1, math.floor(self.cy - self.extent_y) - 1
        x1, y1 = math.ceil(self.cx + self.extent_x) + 1, math.ceil(self.cy + self.extent_y) + 1
        return x0, y0, x1 - x0, y1 - y0


def _downsample(values: np.ndarray, factor: int) -> np.ndarray:
    h, w = values.shape[0] // factor, values.shape[1] // factor
    return values.reshape(h, factor, w, factor, *values.shape[2:]).mean(axis=(1, 3))


def _fill_polygon(points: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """bool ``[rows, cols]``: which sample centres ``(c + 0.5, r + 0.5)`` lie inside ``points``.

    ``points`` ``[K, 2]`` are (x, y) in sample units. Even-odd scanline fill with half-open
    crossings, so a shape covering ``[a, b)`` takes exactly the samples whose centres are in it
    (PIL's polygon fill is inclusive at both ends and would dilate every shape by half a sample).
    """
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    centres = np.arange(rows, dtype=np.float64)[:, None] + 0.5
    crosses = (centres >= np.minimum(y0, y1)) & (centres < np.maximum(y0, y1))  # [rows, K]
    row, edge = np.nonzero(crosses)
    t = (centres[row, 0] - y0[edge]) / (y1[edge] - y0[edge])  # never 0/0: flat edges never cross
    x_cross = x0[edge] + t * (x1[edge] - x0[edge])
    first_inside = np.clip(np.ceil(x_cross - 0.5), 0, cols).astype(np.int64)
    toggles = np.zeros((rows, cols + 1), dtype=np.int32)
    np.add.at(toggles, (row, first_inside), 1)
    return np.cumsum(toggles[:, :cols], axis=1) % 2 == 1


def _supersampled_mask(layers: list[tuple[np.ndarray, bool]], geometry: _Geometry) -> np.ndarray:
    """bool ``[h * 4, w * 4]`` of the shape over ``geometry.patch()``."""
    x0, y0, w, h = geometry.patch()
    mask = np.zeros((h * _SUPERSAMPLE, w * _SUPERSAMPLE), dtype=bool)
    for polygon, adds in layers:
        inside = _fill_polygon((geometry.to_image(polygon) - (x0, y0)) * _SUPERSAMPLE, *mask.shape)
        if adds:
            mask |= inside
        else:
            mask &= ~inside
    return mask


def _tight_box(alpha: np.ndarray, x0: int, y0: int) -> tuple[int, int, int, int] | None:
    """Internal integer box of the pixels that ``alpha`` (coverage ``[h, w]`` whose top-left pixel
    is ``(x0, y0)``) covers by at least a quarter; None when there are none."""
    covered = alpha >= _BOX_COVERAGE
    rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    if rows.size == 0:
        return None
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def _object_colours(name: str, geometry: _Geometry, mask: np.ndarray, colours: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Premultiplied float32 ``[h, w, 3]`` colour of the object over its patch."""
    x0, y0, w, h = geometry.patch()
    xs = x0 + (np.arange(w * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE - geometry.cx
    ys = y0 + (np.arange(h * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE - geometry.cy
    c, s = math.cos(geometry.angle), math.sin(geometry.angle)
    u = (c * xs[None, :] + s * ys[:, None]) / geometry.half_w  # canonical frame coordinates
    v = (-s * xs[None, :] + c * ys[:, None]) / geometry.half_h
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + rng.uniform(0.0, 0.18) * (u * math.cos(light) + v * math.sin(light))
    if name == "stripes":
        cells = rng.integers(3, 7)
        second = np.floor((u + 1) * cells).astype(np.int64) % 2 == 1
    elif name == "checker":
        cells = rng.integers(2, 4)
        second = (np.floor((u + 1) * cells) + np.floor((v + 1) * cells)).astype(np.int64) % 2 == 1
    else:
        second = np.zeros(u.shape, dtype=bool)
    rgb = np.where(second[..., None], colours[1], colours[0]) * shade[..., None]
    return _downsample(rgb * mask[..., None], _SUPERSAMPLE).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# backgrounds and clutter


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # the two photos ship inside scikit-learn

    return tuple(np.ascontiguousarray(image) for image in load_sample_images().images)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    photo = _photos()[int(rng.integers(len(_photos())))]
    src_h, src_w = photo.shape[:2]
    largest = min(src_w / width, src_h / height)
    scale = largest * rng.uniform(0.35, 1.0)
    crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = int(rng.integers(src_w - crop_w + 1)), int(rng.integers(src_h - crop_h + 1))
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(
        (width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.2:
        image = image.transpose(Image.FLIP_TOP_BOTTOM)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0)))
    pixels = np.asarray(image, dtype=np.float32)
    grey = pixels.mean(axis=2, keepdims=True)
    pixels = grey + (pixels - grey) * rng.uniform(0.3, 1.2)             # saturation
    pixels = pixels.mean() + (pixels - pixels.mean()) * rng.uniform(0.6, 1.1)  # contrast
    pixels = pixels * rng.uniform(0.75, 1.25, 3) + rng.uniform(-25, 25, 3)     # colour cast
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_clutter(image, rng)
    return image


def _palette_colour(rng: np.random.Generator) -> np.ndarray:
    base = _PALETTE[int(rng.integers(len(_PALETTE)))]
    return np.clip(base * rng.uniform(0.8, 1.15) + rng.uniform(-18, 18, 3), 0, 255)


def _draw_clutter(image: Image.Image, rng: np.random.Generator) -> None:
    """Lines, lumpy blobs and noise patches: things that look like objects but are no class."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 6))):
        points = rng.uniform(0, 1, (int(rng.integers(2, 5)), 2)) * (width, height)
        colour = tuple(int(c) for c in _palette_colour(rng))
        draw.line([tuple(p) for p in points], fill=colour, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(5, 28)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        wobble = sum(rng.uniform(0.12, 0.3) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
                     for k in (2, 3, 5))
        r = radius * (1 + wobble) * rng.uniform(0.6, 1.0, t.shape)  # ragged, never a clean shape
        r = np.convolve(np.concatenate([r[-2:], r, r[:2]]), np.ones(5) / 5, mode="valid")
        stretch = rng.uniform(0.5, 1.5)
        centre = rng.uniform(0, 1, 2) * (width, height)
        pts = np.stack([centre[0] + r * np.cos(t) * stretch, centre[1] + r * np.sin(t)], axis=1)
        draw.polygon([tuple(p) for p in pts], fill=tuple(int(c) for c in _palette_colour(rng)))
    for _ in range(int(rng.integers(0, 3))):
        w, h = int(rng.integers(8, 41)), int(rng.integers(8, 41))
        noise = rng.uniform(0, 255, (h, w, 3)).astype(np.uint8)
        patch = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5)))
        image.paste(patch, (int(rng.integers(-w // 2, width - w // 2)),
                            int(rng.integers(-h // 2, height - h // 2))))


# ---------------------------------------------------------------------------------------------
# one image


class _Placed:
    def __init__(self, name: str, geometry: _Geometry, box: tuple[int, int, int, int],
                 pixels: int, truncated: bool):
        self.name, self.geometry, self.box, self.pixels = name, geometry, box, pixels
        self.truncated = truncated
        self.difficult = min(box[2] - box[0], box[3] - box[1]) < DIFFICULT_MIN_SIDE

    def voc_object(self) -> VocObject:
        return VocObject(name=self.name, box=tuple(float(v) for v in self.box),
                         difficult=self.difficult, truncated=self.truncated)


def _propose(rng: np.random.Generator, width: int, height: int, placed: list[_Placed],
             first_class: str | None) -> tuple[str, _Geometry]:
    """Class and geometry of a candidate object.

    The first object of an image (``placed`` empty) is of ``first_class`` (random if None),
    medium to large and inside the image, so that every image has one clear instance.
    """
    short = min(width, height)
    first = not placed
    candidates = [p for p in placed if not p.difficult]
    beside = candidates[int(rng.integers(len(candidates)))] if (
        candidates and rng.random() < 0.35) else None
    if first:
        name = first_class or CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        size = short * math.exp(rng.uniform(math.log(0.16), math.log(0.45)))
    elif beside is not None:
        name = beside.name
        size = 2 * math.sqrt(beside.geometry.half_w * beside.geometry.half_h)
        size *= math.exp(rng.uniform(-0.25, 0.25))
    else:
        name = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        if rng.random() < 0.18:
            size = short * rng.uniform(0.035, 0.065)  # tiny: usually ends up difficult
        else:
            size = short * math.exp(rng.uniform(math.log(0.09), math.log(0.45)))

    low_aspect, high_aspect = _ASPECT_RANGE.get(name, _DEFAULT_ASPECT_RANGE)
    aspect = math.exp(rng.uniform(math.log(low_aspect), math.log(high_aspect)))
    half_w, half_h = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2
    spread = _ROTATION_RANGE.get(name, math.pi)
    angle = rng.uniform(-spread, spread)
    shape = _Geometry(0.0, 0.0, half_w, half_h, angle)
    ex, ey = shape.extent_x, shape.extent_y

    if beside is not None:
        direction = rng.uniform(0, 2 * np.pi)
        gap = rng.uniform(0.8, 1.15)  # < 1 overlaps a little, > 1 leaves a gap
        cx = beside.geometry.cx + (beside.geometry.extent_x + ex) * gap * math.cos(direction)
        cy = beside.geometry.cy + (beside.geometry.extent_y + ey) * gap * math.sin(direction)
    elif not first and rng.random() < 0.25:
        # across a border; the centre may lie up to 0.3 half-extents outside
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        side = int(rng.integers(4))
        depth = rng.uniform(-0.3, 0.5)
        if side == 0:
            cx = depth * ex
        elif side == 1:
            cx = width - depth * ex
        elif side == 2:
            cy = depth * ey
        else:
            cy = height - depth * ey
    else:
        cx = rng.uniform(min(ex, width / 2), max(width - ex, width / 2))
        cy = rng.uniform(min(ey, height / 2), max(height - ey, height / 2))
    return name, _Geometry(cx, cy, half_w, half_h, angle)


def _pick_colours(name: str, behind: np.ndarray, rng: np.random.Generator,
                  two_colours: bool | None = None) -> np.ndarray:
    """float32 ``[2, 3]``: main colour (visible against ``behind``, the mean RGB under the object)
    and a second, different one for two-coloured classes (default: striped and checkered)."""
    best, best_distance = None, -1.0
    for _ in range(6):
        colour = _palette_colour(rng)
        distance = float(np.linalg.norm(colour - behind))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= 70:
            break
    second = best
    if two_colours if two_colours is not None else name in ("stripes", "checker"):
        for _ in range(8):
            second = _palette_colour(rng)
            if np.linalg.norm(second - best) >= 90:
                break
    return np.stack([best, second]).astype(np.float32)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of every other image's."""
    return np.random.Generator(np.random.PCG64([seed, index]))


def render_image(seed: int, index: int, size: tuple[int, int] = (320, 240),
                 first_class: str | None = None) -> tuple[np.ndarray, list[VocObject]]:
    """Draw image ``index`` of the dataset with ``seed``.

    Args:
        size: ``(width, height)``.
        first_class: class of the image's first (whole, clearly visible) object; random if None.
    Returns:
        uint8 ``[H, W, 3]`` RGB and its objects (internal boxes, in drawing order).
    """
    width, height = size
    rng = image_rng(seed, index)
    canvas = np.asarray(_background(rng, width, height), dtype=np.float32).copy()
    owner = np.full((height, width), -1, dtype=np.int32)  # which object shows at each pixel
    placed: list[_Placed] = []
    visible: list[int] = []  # pixels of each placed object still showing

    for _ in range(1 + int(rng.choice(len(_OBJECTS_PER_IMAGE), p=_OBJECTS_PER_IMAGE))):
        first = not placed
        for _ in range(_PLACEMENT_TRIES * (4 if first else 1)):  # every image gets its first object
            name, geometry = _propose(rng, width, height, placed, first_class)
            layers = _shape_layers(name, rng)
            mask = _supersampled_mask(layers, geometry)
            alpha = _downsample(mask.astype(np.float32), _SUPERSAMPLE)
            x0, y0, w, h = geometry.patch()
            ix0, iy0 = max(x0, 0), max(y0, 0)
            ix1, iy1 = min(x0 + w, width), min(y0 + h, height)
            total = float(alpha.sum())
            if ix1 <= ix0 or iy1 <= iy0 or total <= 0:
                continue
            inner = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
            region = (slice(iy0, iy1), slice(ix0, ix1))
            alpha_in = alpha[inner]
            inside_share = float(alpha_in.sum()) / total
            if inside_share < (0.999 if first else _MIN_INSIDE_SHARE):
                continue
            box = _tight_box(alpha_in, ix0, iy0)
            own = alpha_in >= 0.5
            pixels = int(own.sum())
            if box is None or pixels < 10:
                continue
            hidden = owner[region][own]
            lost = np.bincount(hidden[hidden >= 0], minlength=len(placed))
            if any(visible[j] - lost[j] < _MIN_VISIBLE_SHARE * placed[j].pixels
                   for j in range(len(placed))):
                continue

            behind = canvas[region][own].mean(axis=0)
            colours = _pick_colours(name, behind, rng)
            premultiplied = _object_colours(name, geometry, mask, colours, rng)[inner]
            canvas[region] = canvas[region] * (1.0 - alpha_in[..., None]) + premultiplied
            owner[region][own] = len(placed)
            for j in range(len(placed)):
                visible[j] -= int(lost[j])
            placed.append(_Placed(name, geometry, box, pixels,
                                  truncated=1.0 - inside_share > TRUNCATED_OUTSIDE_FRACTION))
            visible.append(pixels)
            break

    # camera softness and sensor noise, so edges look photographed rather than rasterised
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(1.5, 4.0),
                                                             (height, width, 3))
    pixels = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return pixels, [p.voc_object() for p in placed]


# ---------------------------------------------------------------------------------------------
# the devkit


def _first_class(index: int, n_trainval: int) -> str:
    """Cycle the first object's class so that every split with >= 8 images has every class.

    train and val interleave trainval (even / odd positions), so trainval cycles in pairs.
    """
    if index < n_trainval:
        return CLASS_NAMES[(index // 2) % len(CLASS_NAMES)]
    return CLASS_NAMES[(index - n_trainval) % len(CLASS_NAMES)]


def make_dataset(out: Path, seed: int = 0, n_trainval: int = 200, n_test: int = 100,
                 size: tuple[int, int] = (320, 240),
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a complete VOC2007-style devkit of synthetic images under ``out``.

    Writes ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` (quality 90),
    ``ImageSets/Main/{trainval,train,val,test}.txt`` and ``<class>_<split>.txt``, and
    ``classes.txt``. Ids are ``000001``...; trainval comes first, then test; train and val are
    trainval's even and odd positions. Every file is written atomically, so an interrupted run
    leaves no half-written file (the image sets are written after all images, but a caller that
    needs an all-or-nothing devkit should generate into a temporary folder and rename it, as
    ``sppcli make-dataset`` does).

    Args:
        out: the devkit folder (created if needed).
        seed: non-negative integer; the same seed and arguments give byte-identical files.
        size: ``(width, height)`` of every image.
        progress: called as ``progress(done, total)`` after each image.
    Returns:
        summary: ``devkit``, ``seed``, ``size``, ``classes``, ``images`` per split, ``objects``
        per split and class, ``difficult`` and ``truncated`` object counts, ``seconds``.
    """
    seed, n_trainval, n_test = int(seed), int(n_trainval), int(n_test)
    width, height = (int(v) for v in size)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n_trainval < 1 or n_test < 1:
        raise ValueError(f"need at least one trainval and one test image, got {n_trainval}, {n_test}")
    if width < 32 or height < 32:
        raise ValueError(f"images must be at least 32 x 32 pixels, got {width} x {height}")
    started = time.perf_counter()
    out = Path(out)
    total = n_trainval + n_test
    ids = [f"{index + 1:06d}" for index in range(total)]
    annotations: dict[str, VocAnnotation] = {}
    for index, image_id in enumerate(ids):
        pixels, objects = render_image(seed, index, (width, height), _first_class(index, n_trainval))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        atomic_write_bytes(out / "JPEGImages" / f"{image_id}.jpg", buffer.getvalue())
        annotation = VocAnnotation(image_id=image_id, width=width, height=height,
                                   objects=tuple(objects))
        write_annotation(out / "Annotations" / f"{image_id}.xml", annotation, f"{image_id}.jpg")
        annotations[image_id] = annotation
        if progress is not None:
            progress(index + 1, total)

    trainval = ids[:n_trainval]
    splits = {"trainval": trainval, "train": trainval[0::2], "val": trainval[1::2],
              "test": ids[n_trainval:]}
    for split, split_ids in splits.items():
        write_image_set(out, split, split_ids)
        write_class_image_sets(out, split, split_ids, annotations, CLASS_NAMES)
    atomic_write_bytes(out / "classes.txt", "".join(f"{c}\n" for c in CLASS_NAMES).encode())

    everything = [o for a in annotations.values() for o in a.objects]
    summary = {
        "seed": seed,
        "size": [width, height],
        "classes": list(CLASS_NAMES),
        "images": {split: len(split_ids) for split, split_ids in splits.items()},
        "objects": {
            split: {c: sum(o.name == c for i in splits[split] for o in annotations[i].objects)
                    for c in CLASS_NAMES}
            for split in ("trainval", "test")
        },
        "difficult": sum(o.difficult for o in everything),
        "truncated": sum(o.truncated for o in everything),
    }
    return {"devkit": str(out), **summary, "seconds": round(time.perf_counter() - started, 3)}
