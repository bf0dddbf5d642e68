"""Import proposal windows a user already has, as a proposals artifact (``proposals.imported``).

Readable files, chosen by suffix (``fmt="auto"``) or by name (``fmt="npz" | "h5" | "mat"``):

- ``.npz`` with one ``[N, 4]`` array per image id (key = id), or an ``ids`` string array plus one
  ``boxes_<id>`` array per id (no pickled objects either way);
- ``.h5`` / ``.hdf5`` with one ``[N, 4]`` dataset per image id at the file's root;
- ``.mat`` in the layout of R-CNN's selective-search release (``selective_search_data/*.mat``):
  an ``images`` cell array of ids and a ``boxes`` cell array of ``[N, 4]`` matrices in MATLAB's
  1-based inclusive ``[y1 x1 y2 x2]`` order; MATLAB v5 files are read with ``scipy.io.loadmat``,
  v7.3 files (HDF5 inside) with h5py.

Coordinate conventions are explicit: ``order`` is ``"xyxy"`` or ``"yxyx"`` and
``one_based_inclusive`` says whether the numbers are VOC-style 1-based inclusive pixel indices
(converted by :func:`sppcli.data.voc.voc_box_to_internal`, the project's one place for that) or
already the internal 0-based continuous pixel edges. Defaults per format: ``.mat`` = 1-based
inclusive ``yxyx``; ``.npz`` / ``.h5`` = internal ``xyxy``.

Each image's boxes then go through the same cleaning as computed proposals (clip to the image,
drop boxes without area or with a side below ``min_size``, drop exact duplicates, keep the first
``max_boxes``, order kept) and are written as the same ``items/<id>.h5`` files, so the pool stage
cannot tell imported from computed proposals.
"""
from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
from PIL import Image

from sppcli.artifacts import StageRun
from sppcli.data.voc import voc_box_to_internal
from sppcli.parallel import progress
from sppcli.stages.proposals import clean_boxes, write_proposal_item

log = logging.getLogger(__name__)

FORMATS = ("npz", "h5", "mat")
ORDERS = ("xyxy", "yxyx")
CONVENTIONS = {  # proposals.imported_convention -> (one_based_inclusive, order)
    "xyxy0": (False, "xyxy"), "xyxy1": (True, "xyxy"),
    "yxyx0": (False, "yxyx"), "yxyx1": (True, "yxyx"),
}
_SUFFIXES = {".npz": "npz", ".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".mat": "mat"}
_DEFAULTS = {"npz": (False, "xyxy"), "h5": (False, "xyxy"), "mat": (True, "yxyx")}
_MAX_LISTED = 5


class ProposalImportError(ValueError):
    """The file cannot be imported; the message names the file and what is wrong."""


def detect_format(source: Path) -> str:
    fmt = _SUFFIXES.get(Path(source).suffix.lower())
    if fmt is None:
        raise ProposalImportError(f"{source}: cannot tell the format from the suffix "
                                  f"(known: {', '.join(sorted(_SUFFIXES))}); name it explicitly")
    return fmt


def parse_convention(source: str | Path, convention: str) -> tuple[str, bool, str]:
    """``proposals.imported_convention`` -> ``(fmt, one_based_inclusive, order)`` for ``source``."""
    fmt = detect_format(Path(source))
    if convention == "auto":
        return (fmt, *_DEFAULTS[fmt])
    if convention not in CONVENTIONS:
        raise ProposalImportError(f"proposals.imported_convention must be auto or one of "
                                  f"{', '.join(CONVENTIONS)}, got {convention!r}")
    return (fmt, *CONVENTIONS[convention])


# ---------------------------------------------------------------------------------------------
# readers: each returns (ids in file order, a function id -> raw [N, 4] array)


BoxReader = Callable[[str], np.ndarray]


def _read_npz(source: Path) -> tuple[list[str], BoxReader, Callable[[], None]]:
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ProposalImportError(f"{source}: cannot read as .npz ({exc})") from None
    keys = list(data.files)
    if "ids" in keys and any(k.startswith("boxes_") for k in keys):
        try:
            ids = [str(i) for i in np.asarray(data["ids"]).reshape(-1)]
        except ValueError as exc:  # an object array needs pickle, which we never allow
            raise ProposalImportError(f"{source}: 'ids' must be a plain string array ({exc})") from None
        missing = [i for i in ids if f"boxes_{i}" not in keys]
        if missing:
            raise ProposalImportError(f"{source}: 'ids' lists {len(missing)} id(s) without a "
                                      f"boxes_<id> array, e.g. {', '.join(missing[:_MAX_LISTED])}")
        return ids, lambda i: data[f"boxes_{i}"], data.close
    return keys, lambda i: data[i], data.close


def _read_h5(source: Path) -> tuple[list[str], BoxReader, Callable[[], None]]:
    try:
        f = h5py.File(source, "r")
    except OSError as exc:
        raise ProposalImportError(f"{source}: cannot read as HDF5 ({exc})") from None
    ids = [name for name, obj in f.items() if isinstance(obj, h5py.Dataset)]
    return ids, lambda i: f[i][()], f.close


def _mat_string(value) -> str:
    """One cell of a scipy-loaded cell array of strings (``array(['000001'])``) -> str."""
    array = np.asarray(value)
    if array.dtype.kind in "US":
        return "".join(str(s) for s in array.reshape(-1))
    if array.dtype.kind in "iuf":  # ids stored as numbers
        return str(int(array.reshape(-1)[0]))
    raise ProposalImportError(f"cannot read an image id from a {array.dtype} cell")


def _read_mat_v5(source: Path) -> tuple[list, list]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(source, variable_names=["images", "boxes"])
    except (ValueError, TypeError, OSError) as exc:
        raise ProposalImportError(f"{source}: cannot read as a MATLAB file ({exc})") from None
    if "boxes" not in mat:
        raise ProposalImportError(f"{source}: no 'boxes' variable (R-CNN selective-search layout expected)")
    boxes = list(np.asarray(mat["boxes"], dtype=object).reshape(-1))
    images = None
    if "images" in mat:
        images = [_mat_string(v) for v in np.asarray(mat["images"], dtype=object).reshape(-1)]
    return images, boxes


def _read_mat_v73(source: Path) -> tuple[list, list]:
    """MATLAB v7.3: HDF5 whose cell arrays hold object references to column-major data."""
    with h5py.File(source, "r") as f:
        if "boxes" not in f:
            raise ProposalImportError(f"{source}: no 'boxes' variable (R-CNN selective-search layout expected)")

        def cells(name: str) -> Iterator[h5py.Dataset]:
            for ref in np.asarray(f[name][()]).reshape(-1):
                yield f[ref]

        def matrix(ds: h5py.Dataset) -> np.ndarray:
            if ds.attrs.get("MATLAB_empty", 0):
                return np.zeros((0, 4))
            return np.asarray(ds[()]).T  # stored transposed (MATLAB is column-major)

        boxes = [matrix(ds) for ds in cells("boxes")]
        images = None
        if "images" in f:
            images = ["".join(chr(c) for c in np.asarray(ds[()]).reshape(-1)) for ds in cells("images")]
    return images, boxes


def _read_mat(source: Path, dataset) -> tuple[list[str], BoxReader, Callable[[], None]]:
    images, boxes = _read_mat_v73(source) if h5py.is_hdf5(source) else _read_mat_v5(source)
    if images is None:
        if len(boxes) != len(dataset):
            raise ProposalImportError(f"{source}: no 'images' variable, and its {len(boxes)} box "
                                      f"matrices cannot be matched to the {len(dataset)} images of {dataset.name}")
        log.warning("%s: no 'images' variable; matching its box matrices to %s in image-set order",
                    source, dataset.name)
        images = list(dataset.ids)
    if len(images) != len(boxes):
        raise ProposalImportError(f"{source}: 'images' has {len(images)} entries but 'boxes' has {len(boxes)}")
    table = dict(zip(images, boxes))
    return list(images), lambda i: table[i], lambda: None


# ---------------------------------------------------------------------------------------------


def to_internal(raw: np.ndarray, one_based_inclusive: bool, order: str) -> np.ndarray:
    """Raw ``[N, 4]`` boxes in the stated convention -> float64 internal ``(x1, y1, x2, y2)``."""
    if order not in ORDERS:
        raise ProposalImportError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    boxes = np.asarray(raw, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalImportError(f"expected an [N, 4] array, got shape {boxes.shape}")
    if order == "yxyx":
        boxes = boxes[:, [1, 0, 3, 2]]
    return voc_box_to_internal(boxes) if one_based_inclusive else boxes.copy()


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:  # header only: the stored pixel grid, as load_rgb decodes it
        return im.size


def import_proposals(source: Path, dataset, out: StageRun, fmt: str = "auto",
                     one_based_inclusive: bool | None = None, order: str | None = None,
                     min_size: float = 0, max_boxes: int | None = None) -> dict:
    """Write ``out``'s proposals items from the boxes in ``source`` (see the module docstring).

    Args:
        source: ``.npz``, ``.h5`` or R-CNN-style ``.mat`` file.
        dataset: the :class:`~sppcli.data.voc.VocDataset` split; every id must be in the file.
        out: the open proposals run; finished items are skipped (an interrupted import resumes).
        fmt: ``"auto"`` (by suffix) or one of ``npz``, ``h5``, ``mat``.
        one_based_inclusive, order: the file's convention; ``None`` = the format's default.
        min_size, max_boxes: the same cleaning as computed proposals (``max_boxes=None``: all).
    Returns:
        A summary: ``format``, ``order``, ``one_based_inclusive``, ``extra_ids`` (ids in the
        file but not in the split, ignored), ``boxes_read`` and ``boxes_dropped`` (by clipping,
        size, duplicates and ``max_boxes``) over the images imported in this call.
    Raises:
        ProposalImportError: unreadable file, bad arrays, or split ids missing from the file.
    """
    source = Path(source)
    if not source.is_file():
        raise ProposalImportError(f"{source}: proposals file not found")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ProposalImportError(f"format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    default_one_based, default_order = _DEFAULTS[fmt]
    one_based = default_one_based if one_based_inclusive is None else bool(one_based_inclusive)
    order = default_order if order is None else order

    if fmt == "npz":
        file_ids, read, close = _read_npz(source)
    elif fmt == "h5":
        file_ids, read, close = _read_h5(source)
    else:
        file_ids, read, close = _read_mat(source, dataset)
    try:
        present = set(file_ids)
        missing = [i for i in dataset.ids if i not in present]
        if missing:
            raise ProposalImportError(
                f"{source}: {len(missing)} of the {len(dataset)} images of {dataset.name} have no "
                f"boxes in the file, e.g. {', '.join(missing[:_MAX_LISTED])} (the file has "
                f"{len(present)} ids, e.g. {', '.join(sorted(present)[:_MAX_LISTED]) or 'none'})")
        extra = len(present - set(dataset.ids))
        if extra:
            log.info("%s: ignoring %d id(s) that are not in %s", source, extra, dataset.name)
        read_total = dropped = 0
        for image_id in progress(out.pending(dataset.ids), desc=f"import proposals {dataset.name}"):
            started = time.perf_counter()
            try:
                boxes = to_internal(read(image_id), one_based, order)
            except ProposalImportError as exc:
                raise ProposalImportError(f"{source}: image {image_id}: {exc}") from None
            width, height = _image_size(dataset.image_path(image_id))
            kept = clean_boxes(boxes, width, height, min_size,
                               len(boxes) if max_boxes is None else max_boxes, round_to_pixels=False)
            read_total += len(boxes)
            dropped += len(boxes) - len(kept)
            write_proposal_item(out.item_path(image_id), kept, width, height,
                                time.perf_counter() - started, f"imported:{fmt}")
    finally:
        close()
    if dropped:
        log.info("%s: dropped %d of %d boxes (outside the image, smaller than %s px, duplicates "
                 "or beyond max_boxes)", source, dropped, read_total, min_size)
    return {"format": fmt, "order": order, "one_based_inclusive": one_based, "extra_ids": extra,
            "boxes_read": read_total, "boxes_dropped": dropped}
