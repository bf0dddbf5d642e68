"""The three engines of map_images give the same per-image results (serial, loky, Dask)."""
import h5py
import numpy as np
import pytest

from sppcli.artifacts import ArtifactStore
from sppcli.parallel import map_images
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import features, proposals
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


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def test_proposals_on_a_dask_cluster_equal_serial(tmp_path, tiny_devkit, cluster):
    config = tiny_config(tiny_devkit, None)
    serial_planner = Planner(ArtifactStore(tmp_path / "serial"), config)
    plan = serial_planner.plan("proposals", "test")
    serial, _ = run_stage(serial_planner, proposals, plan, RunOptions())

    dask_planner = Planner(ArtifactStore(tmp_path / "dask"), config)
    on_dask, ran = run_stage(dask_planner, proposals, dask_planner.plan("proposals", "test"),
                             RunOptions(scheduler=cluster.scheduler_address))
    assert ran and on_dask.key == serial.key
    ids = serial_planner.dataset("test").ids
    a, b = _boxes(serial, ids), _boxes(on_dask, ids)
    for i in ids:
        np.testing.assert_array_equal(a[i], b[i])


def test_features_on_a_dask_cluster_equal_serial(tmp_path, tiny_devkit, tiny_weights, cluster, monkeypatch):
    monkeypatch.setattr(features, "IMAGES_PER_TASK", 3)  # several tasks, spread over both workers
    config = tiny_config(tiny_devkit, tiny_weights)
    serial_planner = Planner(ArtifactStore(tmp_path / "serial"), config)
    serial, _ = run_stage(serial_planner, features, serial_planner.plan("features"), RunOptions(device="cpu"))
    dask_planner = Planner(ArtifactStore(tmp_path / "dask"), config)
    on_dask, ran = run_stage(dask_planner, features, dask_planner.plan("features"),
                             RunOptions(device="cpu", scheduler=cluster.scheduler_address))
    assert ran and on_dask.key == serial.key and on_dask.n_items == serial.n_items
    for image_id in serial_planner.dataset("trainval").ids:
        a = features.read_feature_item(serial.item_path(image_id))
        b = features.read_feature_item(on_dask.item_path(image_id))
        assert a.scale_factors == b.scale_factors and a.map_shapes == b.map_shapes
        for x, y in zip(a.maps, b.maps):
            assert x.tobytes() == y.tobytes()
