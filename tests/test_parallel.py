"""The three engines of map_images give the same per-image results (serial, loky, Dask)."""
import h5py
import numpy as np
import pytest

from sppcli.artifacts import ArtifactStore
from sppcli.parallel import map_images
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import proposals
from tests.conftest import tiny_config


def _square(x: int) -> int:
    return x * x


def test_map_images_keeps_order_across_engines():
    items = list(range(7))
    assert map_images(_square, items) == [x * x for x in items]
    assert map_images(_square, items, workers=2) == [x * x for x in items]
    assert map_images(_square, []) == []


def _boxes(manifest, ids):
    out = {}
    for i in ids:
        with h5py.File(manifest.item_path(i), "r") as f:
            out[i] = f["boxes"][()]
    return out


def test_proposals_on_a_dask_cluster_equal_serial(tmp_path, tiny_devkit):
    distributed = pytest.importorskip("dask.distributed")
    config = tiny_config(tiny_devkit, None)
    serial_planner = Planner(ArtifactStore(tmp_path / "serial"), config)
    plan = serial_planner.plan("proposals", "test")
    serial, _ = run_stage(serial_planner, proposals, plan, RunOptions())

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask_planner = Planner(ArtifactStore(tmp_path / "dask"), config)
        on_dask, ran = run_stage(dask_planner, proposals, dask_planner.plan("proposals", "test"),
                                 RunOptions(scheduler=cluster.scheduler_address))
    assert ran and on_dask.key == serial.key
    ids = serial_planner.dataset("test").ids
    a, b = _boxes(serial, ids), _boxes(on_dask, ids)
    for i in ids:
        np.testing.assert_array_equal(a[i], b[i])
