"""`sppcli make-dataset`: the embedded default devkit, written once and reused while unchanged.

The devkit is an *input* of the pipeline rather than a keyed artifact: later stages digest its
annotations like any user's VOC folder. A ``synth.json`` marker records the generator params, so
rerunning with the same params is a no-op and a folder that is not ours is never overwritten.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from sppcli.artifacts import atomic_write_json
from sppcli.config import Config, as_dict

VERSION = 1
MARKER = "synth.json"
log = logging.getLogger(__name__)


def make_embedded_dataset(config: Config, force: bool = False) -> dict:
    """Generate the synthetic devkit at ``config.dataset.devkit`` unless it is already there."""
    from sppcli.data.synth import make_dataset
    from sppcli.parallel import progress

    out = Path(config.dataset.devkit)
    want = {"version": VERSION, "params": as_dict(config.synth)}
    marker = out / MARKER
    if marker.exists():
        have = json.loads(marker.read_text())
        if not force and {k: have.get(k) for k in want} == want:
            log.info("make-dataset %s: up to date", out)
            return {"devkit": str(out), "up_to_date": True, **have}
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and was not written by `sppcli make-dataset`; refusing to overwrite it")

    # Generate beside the target and swap it in, so an interrupted run never leaves a devkit
    # that looks complete.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    s = config.synth
    t0 = time.time()
    bar = progress(range(s.trainval + s.test), total=s.trainval + s.test, desc="make-dataset")
    summary = make_dataset(tmp, seed=s.seed, n_trainval=s.trainval, n_test=s.test, size=(s.width, s.height),
                           progress=lambda i, n: next(bar, None))
    summary = {k: v for k, v in summary.items() if k != "devkit"}  # it names the temporary folder
    info = {**want, "summary": summary, "seconds": round(time.time() - t0, 2)}
    atomic_write_json(tmp / MARKER, info)
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return {"devkit": str(out), "up_to_date": False, **info}
