import dataclasses
import json
import os

import pytest

from sppcli.stages import STAGES
from sppcli.artifacts import ArtifactStore, Manifest, atomic_path, stage_key
from sppcli.pipeline import Planner
from tests.conftest import tiny_config


def test_key_depends_on_exactly_its_inputs():
    base = stage_key("svm", 1, {"C": 0.001}, {"pool": "a"}, {"dataset": "d"})
    assert base == stage_key("svm", 1, {"C": 0.001}, {"pool": "a"}, {"dataset": "d"})
    assert base != stage_key("svm", 1, {"C": 0.002}, {"pool": "a"}, {"dataset": "d"})
    assert base != stage_key("svm", 2, {"C": 0.001}, {"pool": "a"}, {"dataset": "d"})
    assert base != stage_key("svm", 1, {"C": 0.001}, {"pool": "b"}, {"dataset": "d"})
    assert base != stage_key("svm", 1, {"C": 0.001}, {"pool": "a"}, {"dataset": "e"})
    # dict order never matters: canonical JSON
    assert stage_key("s", 1, {"a": 1, "b": 2}, {}, {}) == stage_key("s", 1, {"b": 2, "a": 1}, {}, {})


def test_planner_keys_chain_through_upstream(tiny_devkit, cache_dir):
    store = ArtifactStore(cache_dir)
    p = Planner(store, tiny_config(tiny_devkit, None))
    ref = {s: p.plan(s).key for s in ("proposals", "features", "pool", "svm", "detect", "evaluate")}

    # an unrelated param leaves upstream stages alone
    q = p.with_overrides(["svm.C=0.5"])
    for s in ("proposals", "features", "pool"):
        assert q.plan(s).key == ref[s]
    # ... and changes the stage that uses it and everything downstream
    for s in ("svm", "detect", "evaluate"):
        assert q.plan(s).key != ref[s]

    # a change at the top propagates to the bottom
    r = p.with_overrides(["proposals.max_boxes=77"])
    for s in ("proposals", "pool", "svm", "detect", "evaluate"):
        assert r.plan(s).key != ref[s]
    assert r.plan("features").key == ref["features"]


def test_version_bump_changes_key(tiny_devkit, cache_dir, monkeypatch):
    p = Planner(ArtifactStore(cache_dir), tiny_config(tiny_devkit, None))
    before = p.plan("detect").key
    pool = STAGES["pool"]
    monkeypatch.setitem(STAGES, "pool", dataclasses.replace(pool, version=pool.version + 1))
    assert p.plan("detect").key != before


def test_external_annotation_change_changes_key(tmp_path, tiny_devkit, cache_dir):
    import shutil

    devkit = tmp_path / "VOC"
    shutil.copytree(tiny_devkit, devkit)
    p = Planner(ArtifactStore(cache_dir), tiny_config(devkit, None))
    before = p.plan("pool", "test").key
    xml = devkit / "Annotations" / f"{p.dataset('test').ids[0]}.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    p2 = Planner(ArtifactStore(cache_dir), tiny_config(devkit, None))
    assert p2.plan("pool", "test").key != before


def test_stage_run_lifecycle_and_state(tmp_path):
    store = ArtifactStore(tmp_path)
    params, up, ext = {"x": 1}, {}, {"dataset": "d"}
    key = stage_key("proposals", 1, params, up, ext)
    assert store.state("proposals", "ds", key, 1, params, up, ext, total_items=3).state == "missing"

    run = store.begin("proposals", "ds", 1, params, up, ext)
    with run.write_item("a") as h5:
        h5["boxes"] = [[0, 0, 1, 1]]
    st = store.state("proposals", "ds", key, 1, params, up, ext, total_items=3)
    assert st.state == "partial" and st.done_items == 1 and "1 of 3" in st.reasons[0]
    assert store.latest("proposals", "ds") is None

    m = run.finish(metrics={"recall": 1.0}, n_items=1)
    assert store.latest("proposals", "ds").key == key
    assert Manifest.read(m.dir / "manifest.json").complete
    assert "items/a.h5" in m.outputs

    # the same stage with other params is stale, and says why
    params2 = {"x": 2}
    key2 = stage_key("proposals", 1, params2, up, ext)
    st = store.state("proposals", "ds", key2, 1, params2, up, ext)
    assert st.state == "stale" and any("proposals.x 1 -> 2" in r for r in st.reasons)


def test_item_write_is_atomic_on_crash(tmp_path):
    store = ArtifactStore(tmp_path)
    run = store.begin("pool", "ds", 1, {}, {}, {})
    with pytest.raises(KeyboardInterrupt):
        with run.write_item("img") as h5:
            h5["features"] = [1.0, 2.0]
            raise KeyboardInterrupt
    assert not run.has_item("img")
    assert not any(p.name.endswith(".h5") for p in run.items_dir.iterdir())


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "model.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.npz"]


def test_file_digests_are_memoised_and_notice_changes(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    d1 = store.digests.file(f)
    store.digests.save()
    memo = json.loads((tmp_path / "cache" / ".digests.json").read_text())
    assert memo[str(f.resolve())][2] == d1
    f.write_bytes(b"abcd")
    assert store.digests.file(f) != d1
