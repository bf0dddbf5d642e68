"""Training sets for SPP-net classifier pretraining: object crops or an image folder, and their views.

Two sources of labelled images (paper section 3 trains on ImageNet; the embedded default trains
on objects of the synthetic VOC-format dataset instead):

* :func:`voc_crop_samples`: every non-difficult object of a VOC-format split, its box enlarged
  by a context margin (:func:`context_box`) and clipped to the image. One object = one sample.
* :func:`folder_samples`: ``<folder>/<class name>/<image>``, one sample per image file.

:func:`holdout_split` holds out whole groups (source images) so that two objects of one image
never land on both sides.

Views (paper sections 3.1 and 2.3), all uint8 ``[H, W, 3]`` RGB arrays:

* training (:func:`train_view`): resize so the shorter side is ``base * 256 / 224``, a random
  ``base x base`` crop, a random horizontal flip, colour jitter; for a training size ``s`` other
  than ``base`` that crop is *resized* to ``s x s`` (same content, another resolution: the
  paper's multi-size training).
* testing: the centre ``s x s`` crop (:func:`centre_view`), the 4 corners + centre and their
  flips (:func:`ten_views`) of the image resized so its shorter side is ``s * 256 / 224``, and
  the full view (:func:`full_view`): the whole image resized so ``min(w, h) = s``, any aspect.

Every random choice of a training view comes from a generator seeded by
``(seed, epoch, sample index)``, so a view does not depend on data-loader worker processes or on
where an interrupted run was resumed.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from sppcli.data.voc import IMAGE_SUFFIXES, VocDataset, load_rgb

#: Training crops are cut from images whose shorter side is ``size * RESIZE_RATIO``
#: (ImageNet practice: 224 crops of images resized to a shorter side of 256).
RESIZE_RATIO = 256.0 / 224.0


@dataclasses.dataclass(frozen=True)
class Sample:
    """One labelled training image.

    path: the image file.
    region: integer pixel rectangle ``(x0, y0, x1, y1)`` to cut from it, half-open
        (columns ``x0 .. x1 - 1``), i.e. internal box coordinates on pixel edges; ``None`` for
        the whole image.
    label: class index.
    group: what the held-out split keeps together (the source image's id or file).
    """

    path: str
    region: tuple[int, int, int, int] | None
    label: int
    group: str


# ---------------------------------------------------------------------------------------------
# building the sample lists


def context_box(box: Sequence[float], context: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Enlarge an object box by ``context`` and snap it outward to whole pixels inside the image.

    Args:
        box: internal ``(x1, y1, x2, y2)`` (0-based continuous pixel edges).
        context: each side moves out by ``context / 2`` of the box's extent along that axis, so
            the crop is ``(1 + context)`` times the box's width and height before clipping
            (0.3: 15% margin on every side).
        width, height: image size in pixels.

    Returns:
        ``(x0, y0, x1, y1)`` ints with ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``.
    """
    if context < 0:
        raise ValueError(f"crop context must be >= 0, got {context}")
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = (x2 - x1) * context / 2.0, (y2 - y1) * context / 2.0
    x0 = min(max(0, math.floor(x1 - mx)), width - 1)
    y0 = min(max(0, math.floor(y1 - my)), height - 1)
    xe = max(min(width, math.ceil(x2 + mx)), x0 + 1)
    ye = max(min(height, math.ceil(y2 + my)), y0 + 1)
    return int(x0), int(y0), int(xe), int(ye)


def voc_crop_samples(dataset: VocDataset, context: float) -> list[Sample]:
    """One sample per non-difficult object of ``dataset`` (in image-list, then object order).

    Labels index ``dataset.classes``; objects of other class names are ignored.
    """
    dataset.check_inputs()
    samples = []
    for image_id in dataset.ids:
        gt = dataset.ground_truth(image_id)
        path = str(dataset.image_path(image_id))
        for box, label, difficult in zip(gt.boxes, gt.labels, gt.difficult):
            if difficult:
                continue
            samples.append(Sample(path, context_box(box, context, gt.width, gt.height), int(label), image_id))
    return samples


def folder_classes(folder: Path) -> tuple[str, ...]:
    """Sub-folder names of ``folder`` in sorted order: the class names of a folder source."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found (pretrain.folder)")
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise ValueError(f"{folder}: no class sub-folders; expected <folder>/<class name>/<image>.jpg")
    return names


def folder_samples(folder: Path) -> tuple[list[Sample], tuple[str, ...]]:
    """Samples of ``<folder>/<class>/<image>`` (jpg/jpeg/png, any case) and the class names.

    Labels index the sorted sub-folder names; images are listed in sorted order per class.
    Each image is its own held-out group.
    """
    folder = Path(folder)
    classes = folder_classes(folder)
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        samples += [Sample(str(p), None, label, str(p.relative_to(folder))) for p in files]
    if not samples:
        raise ValueError(f"{folder}: no .jpg/.jpeg/.png images in the class sub-folders")
    return samples, classes


def holdout_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): a seeded random ``fraction`` of the *groups* is held out.

    ``round(fraction * n_groups)`` groups are held out, at least one when ``fraction > 0`` and
    at most ``n_groups - 1``. Both lists keep the input order. The choice depends only on the
    sorted group names and ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    groups = sorted({s.group for s in samples})
    n_held = 0
    if fraction > 0 and len(groups) > 1:
        n_held = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    order = np.random.default_rng(seed).permutation(len(groups))
    held = {groups[i] for i in order[:n_held]}
    return [s for s in samples if s.group not in held], [s for s in samples if s.group in held]


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Number of samples of each label."""
    counts = np.bincount(np.array([s.label for s in samples], dtype=np.int64), minlength=num_classes)
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------
# pixels


def load_sample(sample: Sample) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB pixels of ``sample`` (its region of the image, or all of it)."""
    image = load_rgb(Path(sample.path))
    if sample.region is None:
        return image
    x0, y0, x1, y1 = sample.region
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize uint8 ``[H, W, 3]`` to ``[height, width, 3]``: area averaging when shrinking (no
    aliasing), bilinear when enlarging."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    shrink = width < w and height < h
    return cv2.resize(image, (int(width), int(height)), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_shorter(image: np.ndarray, shorter: int) -> np.ndarray:
    """Resize keeping the aspect ratio so that ``min(H, W) == shorter`` (the longer side is
    rounded to the nearest pixel, at least ``shorter``)."""
    h, w = image.shape[:2]
    scale = shorter / min(h, w)
    if h <= w:
        return resize(image, max(shorter, round(w * scale)), shorter)
    return resize(image, shorter, max(shorter, round(h * scale)))


def resized_side(size: int) -> int:
    """Shorter side of the image that ``size x size`` crops are cut from: ``round(size * 256 / 224)``."""
    return int(round(size * RESIZE_RATIO))


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation, each a factor in ``[1 - strength, 1 + strength]``.

    uint8 ``[H, W, 3]`` in and out; ``strength == 0`` returns the image unchanged (and draws no
    numbers).
    """
    if strength <= 0:
        return image
    factors = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    x = image.astype(np.float32) * factors[0]
    x = x.mean() + (x - x.mean()) * factors[1]
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * factors[2]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def train_view(image: np.ndarray, size: int, base: int, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """A random ``size x size`` training view of ``image`` (uint8 ``[H, W, 3]``).

    The crop is ``base x base`` of the image resized to a shorter side of ``resized_side(base)``,
    flipped with probability 1/2, colour-jittered, then resized to ``size x size`` if
    ``size != base`` (multi-size training: only the resolution differs between sizes).
    """
    resized = resize_shorter(image, resized_side(base))
    h, w = resized.shape[:2]
    top = int(rng.integers(0, h - base + 1))
    left = int(rng.integers(0, w - base + 1))
    crop = resized[top:top + base, left:left + base]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = colour_jitter(np.ascontiguousarray(crop), rng, jitter)
    return resize(crop, size, size)


def centre_view(image: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size x size`` crop of ``image`` resized to a shorter side of ``resized_side(size)``."""
    resized = resize_shorter(image, resized_side(size))
    h, w = resized.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def ten_views(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[10, size, size, 3]``: the 4 corner crops and the centre crop of the image resized
    to a shorter side of ``resized_side(size)`` (corners of the whole image, as in the paper),
    then the same five flipped horizontally."""
    resized = resize_shorter(image, resized_side(size))
    h, w = resized.shape[:2]
    offsets = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    views = np.stack([resized[t:t + size, l:l + size] for t, l in offsets])
    return np.ascontiguousarray(np.concatenate([views, views[:, :, ::-1]]))


def full_view(image: np.ndarray, size: int) -> np.ndarray:
    """SPP's full view: the whole image the ``size`` crops are cut from, i.e. resized so
    ``min(H, W) == resized_side(size)`` (256 for 224 crops, paper section 3.1.3), any aspect ratio."""
    return resize_shorter(image, resized_side(size))


def to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` numpy -> uint8 ``[..., 3, H, W]`` tensor (normalise on the device
    with :func:`sppcli.nets.sppnet.normalize`)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, -3)))


# ---------------------------------------------------------------------------------------------
# the training set


class TrainCrops(torch.utils.data.Dataset):
    """Augmented training views of ``samples`` at the current epoch's size.

    ``dataset[i]`` is ``(uint8 [3, size, size] tensor, label)``. Call :meth:`set_epoch` before each
    epoch; data-loader workers receive a copy of the dataset (with that epoch) when the loader
    starts iterating.

    Args:
        samples: the training samples.
        base: the largest training size; crops are cut at this size (see :func:`train_view`).
        seed: seeds, with the epoch and the index, each view's random choices.
        jitter: colour jitter strength.
    """

    def __init__(self, samples: Sequence[Sample], base: int, seed: int, jitter: float):
        self.samples = list(samples)
        self.base = int(base)
        self.seed = int(seed)
        self.jitter = float(jitter)
        self.epoch = 0
        self.size = self.base

    def set_epoch(self, epoch: int, size: int) -> None:
        self.epoch, self.size = int(epoch), int(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        view = train_view(load_sample(sample), self.size, self.base, rng, self.jitter)
        return to_chw(view), sample.label
