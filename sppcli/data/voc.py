"""PASCAL VOC devkit reader and writer (``Annotations/*.xml``, ``ImageSets/Main``, ``JPEGImages``).

A *devkit* here is the folder that holds ``Annotations/``, ``ImageSets/Main/`` and ``JPEGImages/``
(``VOCdevkit/VOC2007`` for the real data). An optional ``classes.txt`` in it (one class name a
line) names the classes of a custom dataset.

Box conventions. VOC XML stores 1-based *inclusive* pixel indices (``xmin=1, xmax=W`` is the whole
width). Everything else in sppcli uses 0-based *continuous pixel-edge* float boxes
``(x1, y1, x2, y2)``: pixel column ``i`` covers ``[i, i + 1)``, so the whole image is
``(0, 0, W, H)`` and a box's width is ``x2 - x1``. :func:`voc_box_to_internal` and
:func:`internal_box_to_voc` are the only place that converts between the two; every box this
module returns or accepts (``VocObject.box``, ``GroundTruth.boxes``) is internal.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from sppcli.artifacts import atomic_write_bytes

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

CLASSES_FILE = "classes.txt"
#: What ``dataset.missing_annotations`` may say about an id without ``Annotations/<id>.xml``.
MISSING_ANNOTATIONS = ("error", "empty", "skip")
#: Files named in one data-warning line before "...".
LISTED_FILES = 3

log = logging.getLogger("sppcli.data")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # preference order when several files share an id


class VocError(ValueError):
    """A devkit file is missing or unusable; the message names the file."""


class MissingAnnotationsError(VocError):
    """Ids of a split have no ``Annotations/<id>.xml`` and ``missing_annotations`` is "error"."""


class VocWarning(UserWarning):
    """A devkit file was read with a repair (clipped or dropped box, ignored class names).

    Kept for callers that filter on it; repairs are now reported through the ``sppcli.data``
    logger, one summary line per kind and split (see :meth:`VocDataset.report_data_issues`).
    """


#: Kinds of repair made while reading annotations, and how a summary line describes them.
ISSUE_KINDS = {
    "zero": "boxes touch the image border at 0 (0-based coordinates?); clipped",
    "clipped": "boxes lie partly outside the image; clipped",
    "dropped": "boxes have no area inside the image; dropped",
}


def issue_summary(split: str, count: int, description: str, files: Sequence[str]) -> str:
    """``<split>: <count> <description>: a.xml, b.xml, c.xml, ...`` (the one line per kind)."""
    listed = ", ".join(files[:LISTED_FILES]) + (", ..." if len(files) > LISTED_FILES else "")
    return f"{split}: {count} {description}: {listed}"


# ---------------------------------------------------------------------------------------------
# the one box conversion


def voc_box_to_internal(boxes: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive pixel boxes -> internal 0-based continuous pixel-edge boxes.

    Args:
        boxes: array-like ``[..., 4]`` of ``(xmin, ymin, xmax, ymax)`` as in VOC XML.
    Returns:
        float64 ``[..., 4]`` ``(x1, y1, x2, y2) = (xmin - 1, ymin - 1, xmax, ymax)``.
    """
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[..., :2] -= 1.0
    return out


def internal_box_to_voc(boxes: np.ndarray) -> np.ndarray:
    """Internal 0-based continuous pixel-edge boxes -> VOC 1-based inclusive pixel boxes.

    Args:
        boxes: array-like ``[..., 4]`` of internal ``(x1, y1, x2, y2)``.
    Returns:
        float64 ``[..., 4]`` ``(xmin, ymin, xmax, ymax) = (x1 + 1, y1 + 1, x2, y2)``.
    """
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[..., :2] += 1.0
    return out


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class VocObject:
    """One annotated object; ``box`` is internal ``(x1, y1, x2, y2)``, clipped to the image."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class VocAnnotation:
    """One image's annotation: pixel size and every object, whatever its class name."""

    image_id: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Ground truth of one image restricted to a dataset's classes.

    Attributes:
        boxes: float32 ``[G, 4]`` internal ``(x1, y1, x2, y2)``.
        labels: int64 ``[G]`` index into the dataset's ``classes``.
        difficult: bool ``[G]``.
        truncated: bool ``[G]``.
    """

    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ---------------------------------------------------------------------------------------------
# classes and ids


def resolve_classes(devkit: Path, classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The class names of a devkit, in label order.

    ``classes`` if given; else the lines of ``<devkit>/classes.txt`` (blank lines skipped) if that
    file exists; else the 20 PASCAL VOC classes.
    """
    source = "the classes argument"
    if classes is None:
        path = Path(devkit) / CLASSES_FILE
        if path.is_file():
            source = str(path)
            classes = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            classes = [c for c in classes if c]
        else:
            return VOC_CLASSES
    names = tuple(str(c).strip() for c in classes)
    if not names or any(not n for n in names):
        raise VocError(f"{source}: class names must be non-empty, got {list(names)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VocError(f"{source}: duplicate class names {duplicates}")
    return names


def check_image_id(image_id: str, source: str = "image id") -> str:
    """Return ``image_id`` if it is a plain file stem; ids must never reach outside the devkit."""
    if not isinstance(image_id, str) or not image_id or image_id != image_id.strip():
        raise VocError(f"{source}: bad image id {image_id!r}")
    if ("/" in image_id or "\\" in image_id or os.sep in image_id or ".." in image_id
            or image_id == "." or "\x00" in image_id
            or PurePosixPath(image_id).is_absolute() or PureWindowsPath(image_id).drive):
        raise VocError(f"{source}: image id {image_id!r} is not a plain file name; "
                       "ids may not contain path separators, '..' or absolute paths")
    return image_id


def _read_id_list(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise VocError(f"{path}: image set list not found")
    ids = []
    # utf-8-sig: Windows editors start a saved file with a byte-order mark, which would
    # otherwise become part of the first id.
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        ids.append(check_image_id(fields[0], f"{path}:{lineno}"))
    return tuple(ids)


# ---------------------------------------------------------------------------------------------
# reading


def _text(element: ET.Element | None, tag: str) -> str | None:
    child = element.find(tag) if element is not None else None
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def _flag(element: ET.Element, tag: str, path: Path) -> bool:
    text = _text(element, tag)
    if text is None:
        return False
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text) != 0
    except ValueError:
        raise VocError(f"{path}: <{tag}> must be 0 or 1, got {text!r}") from None


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(round(float(text))) if text is not None else 0
    except ValueError:
        return None
    return value if value > 0 else None


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the stored pixels, from the header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise VocError(f"{path}: cannot read image ({exc})") from None


def check_declared_size(declared: tuple, image: Path, where: str) -> None:
    """Raise VocError unless ``image``'s pixels are ``declared`` (width, height) as ``where`` says.

    The boxes were drawn on an image of the declared size; on an image of another size (resized
    or swapped after annotation) they mark the wrong pixels, so guessing is worse than asking.
    """
    width, height = (int(v) for v in declared)
    try:
        actual = _image_size(image)
    except VocError:
        return  # unreadable: the stage's own decoding names it, after finishing the images before it
    if tuple(actual) != (width, height):
        raise VocError(f"{where} is {width}x{height} but {image} is {actual[0]}x{actual[1]} pixels; "
                       "correct the declared size (and the boxes, if the image was resized after "
                       "annotation)")


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 ``[H, W, 3]`` RGB."""
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # PIL's own convert("RGB") clips 16-bit values at 255, turning most of the image white;
        # PNG's 16-bit grey (the only way these modes come out of jpg/png) spans 0..65535.
        grey = np.asarray(im, dtype=np.float64) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    # L, LA, 1, P, PA, RGBA, CMYK, YCbCr, LAB...: alpha is dropped, palettes expanded.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_rgb(path: Path) -> np.ndarray:
    """Decode a JPEG/PNG file to uint8 ``[H, W, 3]`` RGB in stored pixel order.

    EXIF orientation is deliberately NOT applied: VOC boxes refer to the stored pixel grid, and
    rotating the image would move every object away from its box.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return np.ascontiguousarray(_to_rgb(im))
    except FileNotFoundError:
        raise VocError(f"{path}: image file not found") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise VocError(f"{path}: cannot decode image ({exc})") from None


class VocDataset:
    """One split of a VOC-format devkit.

    Args:
        devkit: folder holding ``Annotations/``, ``ImageSets/Main/`` and ``JPEGImages/``.
        split: image set name; ids come from ``ImageSets/Main/<split>.txt`` in file order.
        classes: class names in label order; see :func:`resolve_classes`.
        missing_annotations: what an id without ``Annotations/<id>.xml`` means, one of
            :data:`MISSING_ANNOTATIONS`: ``"error"`` refuses the split, naming the ids;
            ``"empty"`` gives it no objects (size from the image); ``"skip"`` drops it.
    Raises:
        VocError: the split lists no images, or (``"error"``) some have no annotation file.
    """

    def __init__(self, devkit: Path, split: str, classes: Sequence[str] | None = None,
                 missing_annotations: str = "error"):
        self.devkit = Path(devkit)
        self.split = check_image_id(split, "split name")
        self.classes = resolve_classes(self.devkit, classes)
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        self._classes_from_file = classes is None and (self.devkit / CLASSES_FILE).is_file()
        self.image_set_path = self.devkit / "ImageSets" / "Main" / f"{split}.txt"
        if missing_annotations not in MISSING_ANNOTATIONS:
            raise VocError(f"dataset.missing_annotations = {missing_annotations!r}: expected one of "
                           f"{', '.join(MISSING_ANNOTATIONS)}")
        self.missing_annotations = missing_annotations
        listed = _read_id_list(self.image_set_path)
        if not listed:
            raise VocError(f"{self.image_set_path} lists no images; write one image id a line "
                           "(the JPEGImages file name without extension) or choose another split")
        self.unannotated: frozenset[str] = frozenset(
            i for i in listed if not self.annotation_path(i).is_file())
        self.ids: tuple[str, ...] = self._apply_missing_policy(listed)
        self._annotations: dict[str, VocAnnotation] = {}
        self._xml_sizes: dict[str, tuple[int, int]] = {}
        self._issues: dict[str, dict[str, int]] = {}
        self._images_by_stem: dict[str, list[Path]] | None = None
        self._issues_reported = False
        self._inputs_checked = False

    def _apply_missing_policy(self, listed: tuple[str, ...]) -> tuple[str, ...]:
        missing = [i for i in listed if i in self.unannotated]
        if not missing or self.missing_annotations == "empty":
            return listed
        if self.missing_annotations == "error":
            shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            raise MissingAnnotationsError(
                f"{self.image_set_path}: {len(missing)} of {len(listed)} images have no annotation "
                f"file in {self.devkit / 'Annotations'}: {shown}; add the XML files, or set "
                "dataset.missing_annotations = \"empty\" (no objects) or \"skip\" (drop them)")
        kept = tuple(i for i in listed if i not in self.unannotated)
        if not kept:
            raise VocError(f"{self.image_set_path} lists no images with an annotation file "
                           f"(all {len(listed)} skipped by dataset.missing_annotations = \"skip\"); "
                           f"add XML files to {self.devkit / 'Annotations'}")
        log.warning("%s: skipping %d of %d images that have no annotation file "
                    "(dataset.missing_annotations = \"skip\")", self.split, len(missing), len(listed))
        return kept

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VocDataset({str(self.devkit)!r}, {self.split!r}, {len(self.ids)} images)"

    @property
    def name(self) -> str:
        """``<parent>_<devkit folder>_<split>``, reduced to ``[A-Za-z0-9._-]`` so it can name a folder.

        The parent is included because devkit folders are nearly always called ``VOC2007``:
        ``VOCdevkit_VOC2007_test`` and ``voc-elephants_VOC2007_test`` must not share a cache folder.
        """
        devkit = self.devkit.resolve()
        raw = f"{devkit.parent.name}_{devkit.name}_{self.split}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "dataset"

    # -- paths ----------------------------------------------------------------------------------

    def annotation_path(self, image_id: str) -> Path:
        return self.devkit / "Annotations" / f"{check_image_id(image_id)}.xml"

    def image_path(self, image_id: str) -> Path:
        """``JPEGImages/<id>.jpg``, else ``<id>`` with any of .jpg/.jpeg/.png in any letter case.

        The XML ``<filename>`` is not consulted: custom datasets often disagree with the disk
        about its extension, while the id is what the image set lists.
        """
        check_image_id(image_id)
        folder = self.devkit / "JPEGImages"
        default = folder / f"{image_id}.jpg"
        if default.is_file():
            return default
        if self._images_by_stem is None:
            by_stem: dict[str, list[Path]] = collections.defaultdict(list)
            if folder.is_dir():
                for entry in os.scandir(folder):
                    path = Path(entry.path)
                    if path.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                        by_stem[path.stem].append(path)
            self._images_by_stem = dict(by_stem)
        candidates = self._images_by_stem.get(image_id, [])
        if not candidates:
            raise VocError(f"{default}: image file not found (also tried .jpeg/.png in any case)")
        return min(candidates, key=lambda p: (IMAGE_SUFFIXES.index(p.suffix.lower()), p.name))

    def external_files(self) -> list[Path]:
        """Files whose content defines this dataset's ground truth, for cache keys.

        The image set list, ``classes.txt`` when the class names came from it, and the annotation
        file and image of every id. Images are listed because proposals and features are computed
        from their pixels: an image edited in place, or another devkit with the same XML but other
        images, must not reuse old results (their digests are memoised by size and mtime, so only
        a changed image is read again).
        """
        files = [self.image_set_path]
        if self._classes_from_file:
            files.append(self.devkit / CLASSES_FILE)
        files.extend(self.annotation_path(i) for i in self.ids if i not in self.unannotated)
        files.extend(self.image_path(i) for i in self.ids)
        return files

    # -- content ----------------------------------------------------------------------------------

    def load_image(self, image_id: str) -> np.ndarray:
        """uint8 ``[H, W, 3]`` RGB of the stored pixels (EXIF orientation not applied)."""
        return load_rgb(self.image_path(image_id))

    def annotation(self, image_id: str) -> VocAnnotation:
        """Parsed annotation of ``image_id`` (cached); boxes internal and clipped to the image."""
        cached = self._annotations.get(image_id)
        if cached is None:
            cached = self._parse(image_id)
            self._annotations[image_id] = cached
        return cached

    def _note(self, kind: str, path: Path) -> None:
        per_file = self._issues.setdefault(kind, {})
        per_file[path.name] = per_file.get(path.name, 0) + 1

    def _parse(self, image_id: str) -> VocAnnotation:
        path = self.annotation_path(image_id)
        if image_id in self.unannotated and self.missing_annotations == "empty":
            width, height = _image_size(self.image_path(image_id))
            return VocAnnotation(image_id=image_id, width=int(width), height=int(height), objects=())
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VocError(f"{path}: annotation file not found") from None
        try:
            root = ET.parse(io.BytesIO(data)).getroot()
        except ET.ParseError as exc:
            raise VocError(f"{path}: malformed XML ({exc})") from None

        size = root.find("size")
        width, height = _positive_int(_text(size, "width")), _positive_int(_text(size, "height"))
        if width is None or height is None:
            width, height = _image_size(self.image_path(image_id))
        else:
            self._xml_sizes[image_id] = (width, height)

        objects = []
        for number, element in enumerate(root.findall("object"), 1):
            name = _text(element, "name")
            if name is None:
                raise VocError(f"{path}: object {number} has no <name>")
            bndbox = element.find("bndbox")
            coords = []
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                text = _text(bndbox, tag)
                try:
                    coords.append(float(text))  # some tools write "273.5"
                except (TypeError, ValueError):
                    raise VocError(f"{path}: object {number} ({name}) has a missing or "
                                   f"non-numeric <bndbox>/<{tag}>: {text!r}") from None
            xmin, ymin, xmax, ymax = coords
            for low, a, high, b in (("xmin", xmin, "xmax", xmax), ("ymin", ymin, "ymax", ymax)):
                if a > b:
                    raise VocError(f"{path}: object {number} ({name}) box is inverted: {low} {a:g} > "
                                   f"{high} {b:g}; swap the two values or remove the object")
            box = voc_box_to_internal(np.array(coords))
            clipped = np.clip(box, 0.0, [width, height, width, height])
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                self._note("dropped", path)
                continue
            if not np.array_equal(clipped, box):
                self._note("zero" if min(coords[0], coords[1]) == 0 else "clipped", path)
            objects.append(VocObject(
                name=name,
                box=tuple(float(v) for v in clipped),
                difficult=_flag(element, "difficult", path),
                truncated=_flag(element, "truncated", path),
            ))
        return VocAnnotation(image_id=image_id, width=int(width), height=int(height),
                             objects=tuple(objects))

    def unknown_name_counts(self) -> dict[str, int]:
        """Objects per class name that is not in ``classes``, over the whole split."""
        counts: collections.Counter[str] = collections.Counter()
        for image_id in self.ids:
            counts.update(o.name for o in self.annotation(image_id).objects
                          if o.name not in self._class_index)
        return dict(sorted(counts.items()))

    def report_data_issues(self, unknown_names: bool = True) -> None:
        """Read the whole split once and log one ``sppcli.data`` warning per kind of repair
        (clipped, dropped boxes; class names outside ``classes`` unless not ``unknown_names``),
        naming the first files."""
        if self._issues_reported:
            return
        self._issues_reported = True
        unknown = self.unknown_name_counts() if unknown_names else {}
        for image_id in self.ids:
            self.annotation(image_id)
        for kind, description in ISSUE_KINDS.items():
            per_file = self._issues.get(kind)
            if per_file:
                log.warning("%s", issue_summary(self.split, sum(per_file.values()),
                                                description, list(per_file)))
        if unknown:
            listing = ", ".join(f"{n!r}: {c}" for n, c in unknown.items())
            log.warning("%s: ignoring objects whose class is not one of %d classes (%s): %s",
                        self.split, len(self.classes), self.devkit, listing)

    def check_image_sizes(self) -> None:
        """Refuse the split if an image's pixels disagree with its XML ``<size>`` (only image
        headers are read)."""
        for image_id in self.ids:
            self.annotation(image_id)
            declared = self._xml_sizes.get(image_id)
            if declared is None:
                continue
            check_declared_size(declared, self.image_path(image_id),
                                f"{self.annotation_path(image_id)}: <size>")

    def check_inputs(self) -> None:
        """Before a stage reads images with their annotations: sizes agree, repairs reported."""
        if not self._inputs_checked:
            self.check_image_sizes()
            self.report_data_issues()
            self._inputs_checked = True

    def ground_truth(self, image_id: str) -> GroundTruth:
        """Objects of ``image_id`` whose name is one of ``classes`` as numpy arrays.

        The first call scans the split once and reports (once) what was repaired or ignored.
        """
        self.report_data_issues()
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


def _number(value: float) -> str:
    return str(int(round(value))) if abs(value - round(value)) < 1e-6 else f"{value:.2f}"


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    child = ET.SubElement(parent, tag)
    if text is not None:
        child.text = text
    return child


def annotation_xml(annotation: VocAnnotation, filename: str, folder: str = "VOC2007") -> bytes:
    """The XML a VOC devkit has for ``annotation`` (boxes converted to 1-based inclusive)."""
    root = ET.Element("annotation")
    _sub(root, "folder", folder)
    _sub(root, "filename", filename)
    source = _sub(root, "source")
    _sub(source, "database", "sppcli")
    _sub(source, "annotation", "sppcli")
    size = _sub(root, "size")
    _sub(size, "width", str(int(annotation.width)))
    _sub(size, "height", str(int(annotation.height)))
    _sub(size, "depth", "3")
    _sub(root, "segmented", "0")
    for obj in annotation.objects:
        element = _sub(root, "object")
        _sub(element, "name", obj.name)
        _sub(element, "pose", "Unspecified")
        _sub(element, "truncated", str(int(bool(obj.truncated))))
        _sub(element, "difficult", str(int(bool(obj.difficult))))
        bndbox = _sub(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), internal_box_to_voc(obj.box)):
            _sub(bndbox, tag, _number(float(value)))
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_annotation(path: Path, annotation: VocAnnotation, filename: str,
                     folder: str = "VOC2007") -> None:
    """Atomically write ``annotation`` as VOC XML to ``path`` (``<devkit>/Annotations/<id>.xml``).

    ``filename`` is the image's file name for ``<filename>``; boxes are internal and are written
    1-based inclusive. ``folder`` only fills ``<folder>`` (no reader uses it); it is not taken
    from ``path`` so that the same annotation gives the same bytes wherever it is written.
    """
    atomic_write_bytes(Path(path), annotation_xml(annotation, filename, folder))


def write_image_set(devkit: Path, split: str, ids: Sequence[str]) -> Path:
    """Atomically write ``ImageSets/Main/<split>.txt``, one id a line; returns its path."""
    check_image_id(split, "split name")
    for image_id in ids:
        check_image_id(image_id)
    path = Path(devkit) / "ImageSets" / "Main" / f"{split}.txt"
    atomic_write_bytes(path, "".join(f"{i}\n" for i in ids).encode("utf-8"))
    return path


def class_presence(annotation: VocAnnotation, class_name: str) -> int:
    """VOC per-class image-set flag: 1 if a non-difficult ``class_name`` object is present,
    0 if only difficult ones are, -1 if none."""
    flags = [o.difficult for o in annotation.objects if o.name == class_name]
    if not flags:
        return -1
    return 0 if all(flags) else 1


def write_class_image_sets(devkit: Path, split: str, ids: Sequence[str],
                           annotations: Mapping[str, VocAnnotation],
                           classes: Sequence[str]) -> list[Path]:
    """Atomically write ``ImageSets/Main/<cls>_<split>.txt`` for every class.

    Lines are ``<id> <flag>`` in the devkit's ``"%s %2d"`` layout, flag from
    :func:`class_presence`; ``annotations`` maps every id to its annotation. Returns the paths.
    """
    check_image_id(split, "split name")
    paths = []
    for class_name in classes:
        check_image_id(class_name, "class name")
        lines = [f"{check_image_id(i)} {class_presence(annotations[i], class_name):2d}\n"
                 for i in ids]
        path = Path(devkit) / "ImageSets" / "Main" / f"{class_name}_{split}.txt"
        atomic_write_bytes(path, "".join(lines).encode("utf-8"))
        paths.append(path)
    return paths
