"""Pooling windows on the fly from conv5 maps gives the detector the same bytes as stored vectors.

The whole detection pipeline runs twice on the tiny devkit, once with `pool.store_features=true`
(the pool items hold every window's pooled vector) and once with the default window tables, every
Table 6 row included; every model and result must be identical, not merely close.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from sppcli.artifacts import ArtifactStore
from sppcli.pipeline import VARIANTS, Planner, RunOptions, run_stage
from sppcli.stages import finetune
from tests.conftest import tiny_config

SHARED = [("proposals", "trainval"), ("proposals", "test"), ("features", "trainval"), ("features", "test")]
PER_WAY = [("pool", "trainval"), ("pool", "test"), ("finetune", None), ("bbox_reg", None)]
PER_VARIANT = [("svm", None), ("detect", "test"), ("evaluate", "test")]


def _module(stage):
    import importlib

    return importlib.import_module(f"sppcli.stages.{stage}")


def _run_all(planner: Planner) -> dict:
    out = {}
    for stage, split in SHARED + PER_WAY:
        out[stage, split] = run_stage(planner, _module(stage), planner.plan(stage, split), RunOptions(device="cpu"),
                                      log=lambda msg: None)[0]
    for variant, overrides in VARIANTS.items():
        p = planner.with_overrides(overrides)
        for stage, split in PER_VARIANT:
            out[stage, split, variant] = run_stage(p, _module(stage), p.plan(stage, split),
                                                   RunOptions(device="cpu"), log=lambda msg: None)[0]
    return out


def _npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _h5(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def _same(a: dict, b: dict, what: str, skip=()) -> None:
    assert set(a) == set(b), what
    for k in a:
        if k in skip:
            continue
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, (what, k)
        assert np.array_equal(a[k], b[k]), (what, k)


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory, tiny_devkit, tiny_weights):
    cache = tmp_path_factory.mktemp("two_ways") / "cache"
    stored = _run_all(Planner(ArtifactStore(cache), tiny_config(tiny_devkit, tiny_weights,
                                                                "pool.store_features=true")))
    # On the fly, and with fine-tuning's vectors pooled per chunk of mini-batches instead of all
    # at once (the VOC-size path), over maps that do not all fit the map cache.
    patch = pytest.MonkeyPatch()
    patch.setattr(finetune, "DEFAULT_MAX_CACHE_BYTES", 32 * 3200 * 2 * 3)
    patch.setattr(finetune, "DEFAULT_MAP_CACHE_BYTES", 20_000)
    try:
        fly = _run_all(Planner(ArtifactStore(cache), tiny_config(tiny_devkit, tiny_weights)))
    finally:
        patch.undo()
    return stored, fly


def test_the_two_ways_are_different_artifacts(both_ways):
    stored, fly = both_ways
    assert stored["features", "trainval"].key == fly["features", "trainval"].key  # shared maps
    assert stored["pool", "trainval"].metrics["store_features"] and not fly["pool", "trainval"].metrics["store_features"]
    image_id = _first_id(stored)
    with h5py.File(stored["pool", "test"].item_path(image_id), "r") as f:
        assert "features" in f
    with h5py.File(fly["pool", "test"].item_path(image_id), "r") as f:
        assert "features" not in f and "cells" in f
    assert fly["finetune", None].metrics["features_in_memory"] is False
    assert stored["finetune", None].metrics["features_in_memory"] is True


def _first_id(run) -> str:
    with h5py.File(run["detect", "test", "pool5"].path("detections.h5"), "r") as f:
        return f["image_ids"][0].decode()


def test_fine_tuned_weights_are_identical(both_ways):
    stored, fly = both_ways
    a = torch.load(stored["finetune", None].path("fc.pt"), weights_only=True)["state_dict"]
    b = torch.load(fly["finetune", None].path("fc.pt"), weights_only=True)["state_dict"]
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_box_regressors_are_identical(both_ways):
    stored, fly = both_ways
    _same(_npz(stored["bbox_reg", None].path("bbox_reg.npz")), _npz(fly["bbox_reg", None].path("bbox_reg.npz")),
          "bbox_reg")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_svms_detections_and_ap_are_identical(both_ways, variant):
    stored, fly = both_ways
    a, b = stored["svm", None, variant], fly["svm", None, variant]
    # the history records the training, not the data source; the rest is the model
    _same(_npz(a.path("svms.npz")), _npz(b.path("svms.npz")), f"svms {variant}")
    assert a.metrics["mean_norm"] == b.metrics["mean_norm"]
    _same(_h5(stored["detect", "test", variant].path("detections.h5")),
          _h5(fly["detect", "test", variant].path("detections.h5")), f"detections {variant}")
    ap_a = json.loads(stored["evaluate", "test", variant].path("ap.json").read_text())
    ap_b = json.loads(fly["evaluate", "test", variant].path("ap.json").read_text())
    assert ap_a == ap_b
    assert stored["detect", "test", variant].metrics["n_detections"] > 0
