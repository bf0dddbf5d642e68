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

This module only reads the files; the proposals stage (:mod:`sppcli.stages.proposals`) cleans
each image's boxes as it cleans computed proposals and writes the same items.
"""
from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np

from sppcli.data.voc import voc_box_to_internal

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


def _read_mat(source: Path, split_ids: Sequence[str], split_name: str
              ) -> tuple[list[str], BoxReader, Callable[[], None]]:
    images, boxes = _read_mat_v73(source) if h5py.is_hdf5(source) else _read_mat_v5(source)
    if images is None:
        if len(boxes) != len(split_ids):
            raise ProposalImportError(f"{source}: no 'images' variable, and its {len(boxes)} box "
                                      f"matrices cannot be matched to the {len(split_ids)} images of {split_name}")
        log.warning("%s: no 'images' variable; matching its box matrices to %s in image-set order",
                    source, split_name)
        images = list(split_ids)
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


@dataclasses.dataclass
class ProposalFile:
    """An opened proposals file: its ids in file order, ``read(id)`` -> raw ``[N, 4]`` boxes in
    the file's convention (``one_based_inclusive``, ``order``), and ``close()``."""

    path: Path
    fmt: str
    one_based_inclusive: bool
    order: str
    ids: list[str]
    read: BoxReader
    close: Callable[[], None]

    def boxes(self, image_id: str) -> np.ndarray:
        """One image's boxes as float64 internal ``(x1, y1, x2, y2)``, not yet cleaned."""
        try:
            return to_internal(self.read(image_id), self.one_based_inclusive, self.order)
        except ProposalImportError as exc:
            raise ProposalImportError(f"{self.path}: image {image_id}: {exc}") from None

    def __enter__(self) -> "ProposalFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_proposal_file(source: Path, split_ids: Sequence[str], split_name: str, fmt: str = "auto",
                       one_based_inclusive: bool | None = None, order: str | None = None) -> ProposalFile:
    """Open ``source`` (see the module docstring) for the images ``split_ids`` of ``split_name``.

    Args:
        fmt: ``"auto"`` (by suffix) or one of ``npz``, ``h5``, ``mat``.
        one_based_inclusive, order: the file's convention; ``None`` = the format's default.
    Raises:
        ProposalImportError: unreadable file, or split ids missing from the file (the message
            counts them and names a few, beside a few of the file's own ids).
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
    if order not in ORDERS:
        raise ProposalImportError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if fmt == "npz":
        file_ids, read, close = _read_npz(source)
    elif fmt == "h5":
        file_ids, read, close = _read_h5(source)
    else:
        file_ids, read, close = _read_mat(source, split_ids, split_name)
    present = set(file_ids)
    missing = [i for i in split_ids if i not in present]
    if missing:
        close()
        raise ProposalImportError(
            f"{source}: {len(missing)} of the {len(split_ids)} images of {split_name} have no "
            f"boxes in the file, e.g. {', '.join(missing[:_MAX_LISTED])} (the file has "
            f"{len(present)} ids, e.g. {', '.join(sorted(present)[:_MAX_LISTED]) or 'none'})")
    return ProposalFile(source, fmt, one_based, order, list(file_ids), read, close)
