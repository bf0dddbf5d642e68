"""COCO-format datasets (an instances JSON and a folder of images), read through pycocotools.

:class:`CocoDataset` offers exactly what the stages use of :class:`sppcli.data.voc.VocDataset`
(``ids``, ``classes``, ``name``, ``split``, ``devkit``, ``image_path``, ``load_image``,
``ground_truth``, ``annotation``, ``external_files``, ``len``), so every stage runs on either.

Conventions, and why:

- **Boxes.** COCO's ``bbox`` is ``[x, y, w, h]`` in continuous pixel coordinates (the top-left
  corner of the image is (0, 0), a pixel covers one unit), which is already sppcli's internal
  convention: the box is ``(x, y, x + w, y + h)``, with no +1 anywhere. Boxes are clipped to the
  image and dropped when nothing is left, as the VOC reader does; both repairs are logged once
  per dataset and kind, with a count and the first three annotation ids.
- **Crowds.** ``iscrowd = 1`` objects become ``difficult``: neither positives nor penalties in
  evaluation, and no training positives, which is how COCOeval itself treats them. For the
  reverse direction (:func:`voc_to_coco`, and VOC ground truth in ``evaluate --metric coco``)
  a difficult VOC object is written as a crowd, since pycocotools has no other "ignore" flag
  (it overwrites an ``ignore`` key with ``iscrowd``).
- **Ids** are ``str(image["id"])`` in the order of the JSON's ``images`` list: COCO ids are
  unique integers while file names need not be unique across sub-folders. Artifact items are
  therefore ``items/<id>.h5``.
- **Classes** are the category names in category-id order (COCO's ids have gaps: 1..90 for 80
  classes; label k is the k-th category by id, not ``id - 1``), or the given subset in the
  given order; objects of other categories are left out of the ground truth.
- **Name.** ``<json stem>_<first 8 hex of the JSON's SHA-256>``: COCO files are routinely all
  called ``instances_train.json``, and two different files must never share artifact folders.
- **Files for cache keys** are the JSON and every image (digests are memoised by path, size
  and mtime, so only the first plan of a dataset reads the pixels). They are named relative to
  ``devkit``, the deepest folder holding both the JSON and the images, so a dataset moved as a
  whole keeps its keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sppcli.data.voc import (GroundTruth, VocAnnotation, VocError, VocObject, _image_size,
                             check_declared_size, check_image_id, load_rgb)

log = logging.getLogger(__name__)


class CocoError(VocError):
    """A COCO file is unusable; the message names the file (a VocError, so the CLI prints it
    as one line like every other dataset error)."""


def _quiet_coco(doc: dict):
    """A pycocotools ``COCO`` index of ``doc``, without the progress lines it prints on stdout
    (stdout carries ``--json`` output)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _safe_name(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "dataset"


def _summarise(kind: str, where: str, ann_ids: list) -> None:
    if ann_ids:
        first = ", ".join(str(a) for a in ann_ids[:3])
        more = f" and {len(ann_ids) - 3} more" if len(ann_ids) > 3 else ""
        log.warning("%s: %d box(es) %s (annotation ids %s%s)", where, len(ann_ids), kind, first, more)


class CocoDataset:
    """One COCO instances JSON (one split) and its images.

    Args:
        instances_json: the COCO file (``images``, ``annotations``, ``categories``).
        images_dir: the folder a relative ``file_name`` is joined to; None or "" = the JSON's
            folder. An absolute ``file_name`` is used as it is.
        split_name: the split's label (result file names, messages); default the JSON's stem.
        classes: a subset of the category names, in label order; default all, by category id.
    """

    def __init__(self, instances_json: Path, images_dir: Path | str | None = None,
                 split_name: str | None = None, classes: Sequence[str] | None = None):
        self.json_path = Path(instances_json)
        self.images_dir = Path(images_dir) if images_dir else self.json_path.parent
        try:
            raw = self.json_path.read_bytes()
        except FileNotFoundError:
            raise CocoError(f"{self.json_path}: COCO annotation file not found") from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CocoError(f"{self.json_path}: not a JSON file ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
                or not isinstance(doc.get("categories"), list):
            raise CocoError(f"{self.json_path}: not a COCO instances file (needs 'images' and "
                            "'categories' lists)")
        doc.setdefault("annotations", [])
        self._digest = hashlib.sha256(raw).hexdigest()
        self.split = _safe_name(split_name or self.json_path.stem)
        self.coco = _quiet_coco(doc)

        categories = sorted(doc["categories"], key=lambda c: c["id"])
        names = [str(c.get("name", "")).strip() for c in categories]
        if not names or any(not n for n in names):
            raise CocoError(f"{self.json_path}: every category needs a non-empty name")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise CocoError(f"{self.json_path}: duplicate category names {duplicates}")
        if classes:
            wanted = tuple(str(c).strip() for c in classes)
            unknown = [c for c in wanted if c not in names]
            if unknown:
                raise CocoError(f"{self.json_path}: classes {unknown} are not categories of this "
                                f"file; its categories: {names}")
            if len(set(wanted)) != len(wanted):
                raise CocoError(f"classes: duplicate names in {list(wanted)}")
            self.classes: tuple[str, ...] = wanted
        else:
            self.classes = tuple(names)
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        category_name = {c["id"]: n for c, n in zip(categories, names)}
        self._category_id = {n: c["id"] for c, n in zip(categories, names)}

        self._images: dict[str, dict] = {}
        for number, image in enumerate(doc["images"], 1):
            if "id" not in image or not image.get("file_name"):
                raise CocoError(f"{self.json_path}: images[{number - 1}] needs 'id' and 'file_name'")
            image_id = check_image_id(str(image["id"]), f"{self.json_path}: images[{number - 1}]")
            if image_id in self._images:
                raise CocoError(f"{self.json_path}: image id {image_id} appears twice")
            self._images[image_id] = image
        self.ids: tuple[str, ...] = tuple(self._images)

        self._inputs_checked = False
        self._objects: dict[str, tuple[VocObject, ...]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        clipped, dropped = [], []
        for image_id, image in self._images.items():
            width, height = self._sizes[image_id] = self._size(image_id, image)
            objects = []
            for ann in self.coco.imgToAnns.get(image["id"], []):
                if ann.get("category_id") not in category_name:
                    raise CocoError(f"{self.json_path}: annotation {ann.get('id')} has category_id "
                                    f"{ann.get('category_id')!r}, which no category has")
                bbox = ann.get("bbox")
                try:
                    x, y, w, h = (float(v) for v in bbox)
                except (TypeError, ValueError):
                    raise CocoError(f"{self.json_path}: annotation {ann.get('id')} has no usable "
                                    f"bbox [x, y, w, h]: {bbox!r}") from None
                # plain floats, not numpy: this loop runs once per object (860k for COCO train)
                box = (x, y, x + w, y + h)
                inside = (min(max(x, 0.0), width), min(max(y, 0.0), height),
                          min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))
                if inside != box:
                    clipped.append(ann.get("id"))
                if inside[2] <= inside[0] or inside[3] <= inside[1]:
                    dropped.append(ann.get("id"))
                    continue
                objects.append(VocObject(name=category_name[ann["category_id"]], box=inside,
                                         difficult=bool(ann.get("iscrowd", 0)),
                                         truncated=bool(ann.get("truncated", 0))))
            self._objects[image_id] = tuple(objects)
        _summarise("partly outside their image, clipped", str(self.json_path), clipped)
        _summarise("without area inside their image, dropped", str(self.json_path), dropped)

    def _size(self, image_id: str, image: dict) -> tuple[int, int]:
        try:
            width, height = int(image["width"]), int(image["height"])
            if width > 0 and height > 0:
                return width, height
        except (KeyError, TypeError, ValueError):
            pass
        return _image_size(self.image_path(image_id))  # the JSON may omit sizes; the header has them

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"CocoDataset({str(self.json_path)!r}, {str(self.images_dir)!r}, {len(self.ids)} images)"

    @property
    def name(self) -> str:
        return _safe_name(f"{self.json_path.stem}_{self._digest[:8]}")

    @property
    def devkit(self) -> Path:
        """The folder :meth:`external_files` are named relative to (see the module docstring)."""
        return Path(os.path.commonpath([self.json_path.parent.absolute(), self.images_dir.absolute()]))

    # -- paths ----------------------------------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        image = self._images.get(image_id)
        if image is None:
            raise CocoError(f"{self.json_path}: no image with id {image_id!r}")
        path = Path(image["file_name"])
        if not path.is_absolute():
            path = self.images_dir.absolute() / path
        if not path.is_file():
            raise CocoError(f"{path}: image file not found (image id {image_id} of {self.json_path}; "
                            "relative file_names are joined to dataset.images)")
        return path

    def external_files(self) -> list[Path]:
        """The JSON and every image: what this dataset's ground truth and pixels come from."""
        return [self.json_path.absolute()] + [self.image_path(i) for i in self.ids]

    def check_inputs(self) -> None:
        """Before a stage reads images with their annotations: refuse an image whose pixels
        disagree with the JSON's ``width``/``height`` (its boxes were drawn on another image)."""
        if self._inputs_checked:
            return
        for image_id in self.ids:
            declared = self._images[image_id].get("width"), self._images[image_id].get("height")
            if None in declared:
                continue
            image = self.image_path(image_id)
            check_declared_size(declared, image, f"{self.json_path}: image id {image_id}")
        self._inputs_checked = True

    def results_ids(self, image_id: str, label: int) -> tuple[Any, Any]:
        """(image id, category id) as this file writes them, for a COCO results file."""
        return self._images[image_id]["id"], self._category_id[self.classes[label]]

    # -- content ----------------------------------------------------------------------------------

    def load_image(self, image_id: str) -> np.ndarray:
        """uint8 ``[H, W, 3]`` RGB of the stored pixels (EXIF orientation not applied)."""
        return load_rgb(self.image_path(image_id))

    def annotation(self, image_id: str) -> VocAnnotation:
        """Every object of ``image_id``, whatever its category; boxes internal and clipped."""
        if image_id not in self._objects:
            raise CocoError(f"{self.json_path}: no image with id {image_id!r}")
        width, height = self._sizes[image_id]
        return VocAnnotation(image_id=image_id, width=width, height=height, objects=self._objects[image_id])

    def ground_truth(self, image_id: str) -> GroundTruth:
        """Objects of ``image_id`` whose category is one of ``classes``; crowds are difficult."""
        ann = self.annotation(image_id)
        kept = [o for o in ann.objects if o.name in self._class_index]
        return GroundTruth(
            image_id=image_id,
            width=ann.width,
            height=ann.height,
            boxes=np.array([o.box for o in kept], dtype=np.float32).reshape(-1, 4),
            labels=np.array([self._class_index[o.name] for o in kept], dtype=np.int64),
            difficult=np.array([o.difficult for o in kept], dtype=bool),
            truncated=np.array([o.truncated for o in kept], dtype=bool),
        )


# ---------------------------------------------------------------------------------------------
# writing


def instances_from_ground_truth(image_ids: Sequence[str], ground_truth, classes: Sequence[str],
                                file_name=None) -> dict:
    """A COCO instances dict of ground truth: the one conversion both :func:`voc_to_coco` and
    the COCO evaluation of any dataset use.

    Args:
        image_ids: the images, in order; COCO image ``i`` (0-based) gets id ``i + 1``.
        ground_truth: ``ground_truth(image_id) -> GroundTruth``.
        classes: label order; label ``k`` becomes category id ``k + 1``.
        file_name: ``file_name(image_id) -> str``; default the id itself.
    Difficult objects are written as crowds (``iscrowd = 1``), truncated ones with an extra
    ``"truncated": 1`` that pycocotools ignores and :class:`CocoDataset` reads back.
    """
    images, annotations = [], []
    for number, image_id in enumerate(image_ids, 1):
        gt = ground_truth(image_id)
        images.append({"id": number, "file_name": file_name(image_id) if file_name else str(image_id),
                       "width": int(gt.width), "height": int(gt.height)})
        for box, label, difficult, truncated in zip(gt.boxes.astype(np.float64), gt.labels,
                                                    gt.difficult, gt.truncated):
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": number, "category_id": int(label) + 1,
                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(bool(difficult)),
                "truncated": int(bool(truncated)),
                # the box as a polygon: tools that insist on a segmentation get the box itself
                "segmentation": [[x1, y1, x1, y2, x2, y2, x2, y1]],
            })
    return {"info": {"description": "written by sppcli"}, "licenses": [], "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name, "supercategory": "object"}
                           for k, name in enumerate(classes)]}


def voc_to_coco(voc_dataset, images_dir: Path | None = None) -> dict:
    """The COCO instances JSON (a dict; ``json.dump`` it) of a dataset's ground truth.

    Args:
        voc_dataset: a :class:`~sppcli.data.voc.VocDataset` (any dataset with ``ids``,
            ``classes``, ``ground_truth`` and ``image_path`` will do).
        images_dir: ``file_name`` is the image's path relative to this folder; default the
            devkit's ``JPEGImages`` (so ``dataset.images = "<devkit>/JPEGImages"`` reads it back).
    Image ids are 1..N in the dataset's order; categories 1..K in its class order; objects of
    other classes are not written. :class:`CocoDataset` reads back the same ground truth.
    """
    folder = Path(images_dir) if images_dir is not None else Path(voc_dataset.devkit) / "JPEGImages"
    folder = folder.absolute()

    def file_name(image_id: str) -> str:
        path = Path(voc_dataset.image_path(image_id)).absolute()
        try:
            return path.relative_to(folder).as_posix()
        except ValueError:
            return str(path)  # outside the folder: absolute, which CocoDataset uses as it is

    doc = instances_from_ground_truth(voc_dataset.ids, voc_dataset.ground_truth, voc_dataset.classes,
                                      file_name)
    doc["info"] = {"description": f"{getattr(voc_dataset, 'name', 'dataset')}, converted by sppcli"}
    return doc


def results_file(dataset, image_ids: Sequence[str], image_index: np.ndarray, labels: np.ndarray,
                 boxes: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Detections as a COCO results list (``[{image_id, category_id, bbox, score}]``).

    On a COCO dataset the ids are the instances file's own, so ``COCO.loadRes`` of the original
    file accepts the list as it is; on a VOC dataset images keep their VOC ids (strings) and
    category ``k + 1`` is class ``k``, as :func:`voc_to_coco` numbers them.
    """
    own_ids = getattr(dataset, "results_ids", None)
    results = []
    for i in range(len(scores)):
        image_id, label = image_ids[int(image_index[i])], int(labels[i])
        coco_image, category = own_ids(image_id, label) if own_ids else (image_id, label + 1)
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        results.append({"image_id": coco_image, "category_id": category,
                        "category": dataset.classes[label],
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(scores[i]), 5)})
    return results


def is_coco_file(path: str | Path) -> bool:
    """Whether a ``dataset.devkit`` value names a COCO JSON rather than a VOC devkit folder."""
    return str(path).lower().endswith(".json")


