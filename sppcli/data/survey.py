"""What a user's dataset looks like, and the settings that suit it (`sppcli init`).

The paper's settings assume VOC: ~500 x 375 images whose objects are mostly over 50 pixels.
Proposals are computed on images shrunk to ``proposals.max_side`` and drop windows under
``proposals.min_size``; conv5 maps are made at ``features.scales`` (the image's shorter side).
A dataset of 1920 x 1080 street photos with 20-pixel pedestrians needs other values, or
selective search never proposes the pedestrians (19.7% recall at the demo's settings on such
a set) and the pooled windows span less than a conv5 cell. :func:`survey` reads the
annotations (and image headers) once; :func:`suggest` turns the sizes into settings, each with
the reason it was chosen.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

#: Selective search needs an object to span about this many pixels of the image it segments.
SEGMENTED_OBJECT = 16
#: ...and the paper's scale (min side 688 for VOC's 375) makes a median VOC object ~224 px,
#: the size a window's best scale aims for (pool.target_size).
PAPER_SCALE, VOC_SHORT_SIDE = 688, 375
#: The release's five scales, relative to its 688.
FIVE_SCALES = (480, 576, 688, 874, 1200)


@dataclasses.dataclass(frozen=True)
class Survey:
    """Sizes of a split: ``image_sizes`` int ``[N, 2]`` (w, h); ``object_sides`` float ``[M, 2]``
    (shorter, longer side of each non-difficult object); ``class_counts`` name -> objects;
    ``images_without_objects``."""

    split: str
    image_sizes: np.ndarray
    object_sides: np.ndarray
    class_counts: dict[str, int]
    images_without_objects: int

    @property
    def images(self) -> int:
        return int(len(self.image_sizes))

    def percentile(self, which: str, q: float) -> float:
        values = {"short": self.object_sides[:, 0], "long_image": self.image_sizes.max(axis=1),
                  "short_image": self.image_sizes.min(axis=1)}[which]
        return float(np.percentile(values, q)) if values.size else float("nan")


def survey(dataset) -> Survey:
    """Read every annotation of a split (a VocDataset or anything with its interface)."""
    sizes, sides, counts, empty = [], [], Counter(), 0
    for image_id in dataset.ids:
        annotation = dataset.annotation(image_id)
        sizes.append((annotation.width, annotation.height))
        objects = [o for o in annotation.objects if not o.difficult]
        empty += not objects
        for o in objects:
            w, h = o.box[2] - o.box[0], o.box[3] - o.box[1]
            sides.append((min(w, h), max(w, h)))
            counts[o.name] += 1
    return Survey(split=dataset.split, image_sizes=np.array(sizes, np.int64).reshape(-1, 2),
                  object_sides=np.array(sides, np.float64).reshape(-1, 2), class_counts=dict(counts.most_common()),
                  images_without_objects=empty)


def _round16(value: float) -> int:
    return int(16 * round(value / 16))


def suggest(s: Survey) -> dict[str, tuple[Any, str]]:
    """``{"section.key": (value, reason)}`` for a dataset of these sizes."""
    out: dict[str, tuple[Any, str]] = {}
    if not s.images:
        raise ValueError(f"split {s.split!r} has no images to survey")
    long_side = s.percentile("long_image", 50)
    short_image = s.percentile("short_image", 50)
    small = s.percentile("short", 10) if s.object_sides.size else float("nan")
    median_object = s.percentile("short", 50) if s.object_sides.size else float("nan")

    # proposals: segment at a size where the 10th-percentile object still spans ~16 px
    if math.isnan(small):
        max_side = int(min(long_side, 500))
        why = "no objects to measure; the paper's 500"
    else:
        need = SEGMENTED_OBJECT * long_side / max(small, 1.0)
        max_side = int(min(long_side, max(500, _round16(need))))  # never below the paper's 500
        why = (f"images are {long_side:.0f} px on their longer side (median) and 10% of objects are under "
               f"{small:.0f} px on their shorter side: at {max_side} they span "
               f"{small * max_side / long_side:.0f} px in the segmented image (selective search needs ~"
               f"{SEGMENTED_OBJECT}){'; capped at the full size' if max_side >= long_side else ''}")
    out["proposals.max_side"] = (max_side, why)
    min_size = 16 if math.isnan(small) else int(max(4, min(16, math.floor(small * 0.8))))
    out["proposals.min_size"] = (min_size, "windows under this many original pixels are dropped: below most "
                                           f"objects' shorter side (10th percentile {small:.0f} px)"
                                 if not math.isnan(small) else "the paper's")

    # features: the scale that makes the median object ~224 px / the paper's VOC ratio
    if math.isnan(median_object):
        scale = PAPER_SCALE
        why = "no objects to measure; the paper's 688"
    else:
        by_objects = 224 * short_image / max(median_object, 1.0)
        scale = int(np.clip(_round16(min(by_objects, short_image * PAPER_SCALE / VOC_SHORT_SIDE)), 224, 1200))
        why = (f"the median object is {median_object:.0f} px on its shorter side in {short_image:.0f} px-high "
               f"images: at min side {scale} it is ~{median_object * scale / short_image:.0f} px, near the 224 px a "
               f"window's scale aims for (capped at the paper's ratio {PAPER_SCALE}/{VOC_SHORT_SIDE} of the image "
               "and at 1200)")
    out["features.scales"] = ([scale], why)
    five = [int(_round16(scale * f / PAPER_SCALE)) for f in FIVE_SCALES]
    out["features.scales_5"] = (five, "for 5 scales (--set features.scales=...), the release's ratios around it")
    long_scaled = long_side * scale / short_image
    out["features.max_side"] = (int(max(2000, _round16(long_scaled * 1200 / scale))),
                                "room for the longest image side at the largest of the five scales")
    return out
