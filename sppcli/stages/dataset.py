"""`sppcli make-dataset`: the embedded default devkit and its folder-per-class sets, each written
once and reused while unchanged.

These are *inputs* of the pipeline rather than keyed artifacts: later stages digest their files
like any user's folder. A ``synth.json`` marker records the generator params, so rerunning with
the same params is a no-op and a folder that is not ours is never overwritten. The marker of a
folder-per-class set holds no timings: the pretrain stage's key digests every file of its folder,
so regenerating the same set must give the same bytes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from sppcli.artifacts import atomic_write_json
from sppcli.config import Config, as_dict

VERSION = 1
MARKER = "synth.json"
#: make-dataset's kinds: the VOC-format detection devkit, then the folder-per-class sets.
KINDS = ("detection", "classification", "caltech")
#: Per kind: (images per class, crop side). The pretraining set is at the demo's pretrain size;
#: the Table 4 set has >= 30 train + 50 test images per class (the paper's Caltech101 protocol).
CLASSIFICATION_DEFAULTS = {"classification": (150, 80), "caltech": (80, 96)}
log = logging.getLogger(__name__)


def _up_to_date(out: Path, want: dict, force: bool) -> dict | None:
    """The marker's contents when ``out`` holds what ``want`` describes; raises when ``out`` is
    someone else's folder."""
    marker = out / MARKER
    if marker.exists():
        have = json.loads(marker.read_text())
        if not force and {k: have.get(k) for k in want} == want:
            log.info("make-dataset %s: up to date", out)
            return have
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and was not written by `sppcli make-dataset`; refusing to overwrite it")
    return None


def _write_swapped(out: Path, generate: Callable[[Path], dict]) -> None:
    """``generate(tmp)`` beside ``out``, then swap it in, so an interrupted run never leaves a
    folder that looks complete and the old one stays until the new one is."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(tmp / MARKER, generate(tmp))
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def make_embedded_dataset(config: Config, force: bool = False) -> dict:
    """Generate the synthetic devkit at ``config.dataset.devkit`` unless it is already there."""
    from sppcli.data.synth import make_dataset
    from sppcli.parallel import progress

    out = Path(config.dataset.devkit)
    want = {"version": VERSION, "params": as_dict(config.synth)}
    have = _up_to_date(out, want, force)
    if have is not None:
        return {"devkit": str(out), "up_to_date": True, **have}

    s = config.synth
    t0 = time.time()
    info = {}

    def generate(tmp: Path) -> dict:
        bar = progress(range(s.trainval + s.test), total=s.trainval + s.test, desc="make-dataset")
        summary = make_dataset(tmp, seed=s.seed, n_trainval=s.trainval, n_test=s.test, size=(s.width, s.height),
                               progress=lambda i, n: next(bar, None))
        summary = {k: v for k, v in summary.items() if k != "devkit"}  # it names the temporary folder
        info.update(want, summary=summary, seconds=round(time.time() - t0, 2))
        return info

    _write_swapped(out, generate)
    return {"devkit": str(out), "up_to_date": False, **info}


def classification_folder(config: Config, kind: str) -> Path:
    """Where a folder-per-class set goes by default: the folder the config reads it from
    (``pretrain.folder`` / ``classify.folder``), else beside the detection devkit."""
    if kind not in CLASSIFICATION_DEFAULTS:
        raise ValueError(f"unknown folder-per-class set {kind!r}; expected one of {', '.join(CLASSIFICATION_DEFAULTS)}")
    configured = config.pretrain.folder if kind == "classification" else config.classify.folder
    default_name = "imagenet" if kind == "classification" else "caltech"
    return Path(configured) if configured else Path(config.dataset.devkit).parent / default_name


def make_classification_dataset(config: Config, kind: str, out: Path | None = None, per_class: int | None = None,
                                size: int | None = None, force: bool = False) -> dict:
    """Generate the ``kind`` folder-per-class set (see :mod:`sppcli.data.synth_classification`)
    at ``out`` (default :func:`classification_folder`) unless it is already there."""
    from sppcli.data.synth_classification import KINDS as CLASSES, make_classification_set
    from sppcli.parallel import progress

    out = Path(out) if out is not None else classification_folder(config, kind)
    default_per_class, default_size = CLASSIFICATION_DEFAULTS[kind]
    params = {"seed": int(config.synth.seed), "per_class": int(per_class or default_per_class),
              "size": int(size or default_size)}
    want = {"version": VERSION, "kind": kind, "params": params}
    have = _up_to_date(out, want, force)
    if have is not None:
        return {"folder": str(out), "up_to_date": True, **have}

    t0 = time.time()
    info = {}

    def generate(tmp: Path) -> dict:
        total = len(CLASSES[kind]) * params["per_class"]
        bar = progress(range(total), total=total, desc=f"make-dataset {kind}")
        summary = make_classification_set(tmp, kind=kind, **params, progress=lambda i, n: next(bar, None))
        # no timings in the marker: it is one of the files the pretrain stage's key digests
        info.update(want, summary={k: v for k, v in summary.items() if k != "seconds"})
        return dict(info)

    _write_swapped(out, generate)
    return {"folder": str(out), "up_to_date": False, **info, "seconds": round(time.time() - t0, 2)}
