"""The artifact store under faults: forced reruns that fail, full disks, damaged items and
manifests, concurrent commands, Ctrl-C. Each fault must end in one clear line, lose nothing
complete, and leave a state that the same command (or the one named) repairs."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result

from sppcli.artifacts import ArtifactStore, DamagedItem, RunInUse, RunLock, atomic_path, open_item, verify
from sppcli.cli import main
from sppcli.pipeline import Interrupted, Planner, execute
from tests.conftest import REPO, tiny_config, tiny_sets


def _planner(devkit: Path, cache: Path) -> Planner:
    return Planner(ArtifactStore(cache), tiny_config(devkit, None))


def _fake_stage(value: float, fail_after: int | None = None, exc: BaseException | None = None):
    """A per-image stage writing one small HDF5 item per image; raises ``exc`` after
    ``fail_after`` items. Called as ``stage(ids)(upstream, out)`` by :func:`_execute`."""

    return lambda ids: lambda upstream, out: _write_items(out, ids, value, fail_after, exc)


def _write_items(out, ids, value, fail_after, exc):
    for n, image_id in enumerate(out.pending(ids)):
        if fail_after is not None and n == fail_after:
            raise exc or RuntimeError("stage failed")
        with atomic_path(out.item_path(image_id)) as tmp, h5py.File(tmp, "w") as f:
            f["boxes"] = np.full((3, 4), value, np.float32)
    return out.finish(n_items=len(ids))


def _execute(planner: Planner, plan, stage, **kw):
    return execute(planner, plan, stage(planner.dataset(plan.split).ids), **kw)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _proposals_args(devkit: Path, cache: Path, *extra: str) -> list[str]:
    sets = [a for s in tiny_sets(devkit) for a in ("--set", s)]
    return ["proposals", "--cache-dir", str(cache), "--split", "test", "-q", *sets, *extra]


def _run_dir(cache: Path, stage: str = "proposals") -> Path:
    dirs = [p.parent for p in cache.glob(f"{stage}/*/*/manifest.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _boxes(run_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for item in sorted((run_dir / "items").glob("*.h5")):
        with h5py.File(item, "r") as f:
            out[item.stem] = f["boxes"][()]
    return out


@pytest.fixture(scope="module")
def clean_proposals(tiny_devkit, tmp_path_factory) -> dict[str, np.ndarray]:
    """Boxes of an uninterrupted proposals run on the test split: what every repaired run must equal."""
    cache = tmp_path_factory.mktemp("clean")
    result = _invoke(*_proposals_args(tiny_devkit, cache))
    assert result.exit_code == 0, result.output
    return _boxes(_run_dir(cache))


# ------------------------------------------------------------------------------------ 1. --force


def test_forced_run_that_fails_leaves_the_old_run_complete(tiny_devkit, cache_dir):
    planner = _planner(tiny_devkit, cache_dir)
    plan = planner.plan("proposals", "test")
    old, ran = _execute(planner, plan, _fake_stage(1.0))
    assert ran and old.complete
    before = _snapshot(old.dir)

    for exc in (RuntimeError("stage failed"), KeyboardInterrupt()):
        with pytest.raises((RuntimeError, Interrupted)):
            _execute(planner, plan, _fake_stage(2.0, fail_after=2, exc=exc), force=True)
        assert _snapshot(old.dir) == before
        assert planner.state(plan).state == "complete"
        assert not [p for p in old.dir.parent.iterdir() if ".forced-" in p.name]

    # a forced run killed outright leaves its sibling behind: ignored by status, removed by the next run
    leftover = old.dir.with_name(f".{old.dir.name}.forced-999999")
    (leftover / "items").mkdir(parents=True)
    assert planner.state(plan).state == "complete"
    new, ran = _execute(planner, plan, _fake_stage(3.0), force=True)
    assert ran and new.dir == old.dir and not leftover.exists()
    assert all((v == 3.0).all() for v in _boxes(new.dir).values()) and len(_boxes(new.dir)) == 6
    assert planner.state(plan).state == "complete" and verify(new) == []
    assert not [p for p in old.dir.parent.iterdir() if ".forced-" in p.name or ".replaced-" in p.name]

    # a swap killed after moving the old run aside and before renaming the new one in
    replaced = old.dir.with_name(f".{old.dir.name}.replaced-999999")
    os.replace(old.dir, replaced)
    again, _ = _execute(planner, plan, _fake_stage(4.0))
    assert not replaced.exists() and all((v == 3.0).all() for v in _boxes(again.dir).values())


# ------------------------------------------------------------------------------------ 2. full disk


@pytest.mark.parametrize("where", ["write", "close"])
def test_disk_full_is_one_line_and_a_rerun_equals_a_clean_run(tiny_devkit, tmp_path, monkeypatch, where,
                                                              clean_proposals):
    calls = {"n": 0}
    if where == "write":
        original = h5py.File.create_dataset

        def faulty(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, *a, **kw)

        monkeypatch.setattr(h5py.File, "create_dataset", faulty)
    else:
        original = h5py.File.close

        def faulty(self):
            writing = self.id.valid and self.mode == "r+"
            original(self)
            if writing:
                calls["n"] += 1
                if calls["n"] == 2:
                    # h5py's own wording: a bare OSError whose text carries the errno
                    raise OSError("Can't close file (file write failed: errno = 28, error message = "
                                  "'No space left on device')")

        monkeypatch.setattr(h5py.File, "close", faulty)
    cache = tmp_path / "cache"
    result = _invoke(*_proposals_args(tiny_devkit, cache))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.fullmatch(r"Error: disk full writing \S+/items/\S+\.h5; free space and rerun the same command",
                        lines[0]), lines[0]
    items = list(cache.glob("proposals/*/*/items/*"))
    assert not [p for p in items if p.name.startswith(".") and p.name != ".sums"], "temporaries left"
    for item in cache.glob("proposals/*/*/items/*.h5"):  # whatever has a final name is whole
        with h5py.File(item, "r") as f:
            f["boxes"][()]

    monkeypatch.undo()
    result = _invoke(*_proposals_args(tiny_devkit, cache))
    assert result.exit_code == 0, result.output
    resumed = _boxes(_run_dir(cache))
    assert resumed.keys() == clean_proposals.keys()
    for image_id, boxes in clean_proposals.items():
        np.testing.assert_array_equal(resumed[image_id], boxes)


# ------------------------------------------------------------------------------------ 3. checksums


def test_damaged_items_are_named_by_the_next_stage_and_by_verify(tiny_devkit, tmp_path):
    cache = tmp_path / "cache"
    assert _invoke(*_proposals_args(tiny_devkit, cache)).exit_code == 0
    run_dir = _run_dir(cache)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    items = sorted((run_dir / "items").glob("*.h5"))
    assert set(manifest["checksums"]) == set(manifest["outputs"]) and len(items) == 6
    status_args = ["status", "--cache-dir", str(cache), "--verify",
                   *[a for s in tiny_sets(tiny_devkit) for a in ("--set", s)]]
    clean = _invoke(*status_args)
    assert clean.exit_code == 0 and "damaged: " not in clean.output and " damaged " not in clean.output

    # same size, other bytes: only the hash can tell
    flipped = items[1]
    data = bytearray(flipped.read_bytes())
    data[-20:] = bytes(b ^ 0xFF for b in data[-20:])
    flipped.write_bytes(bytes(data))
    result = _invoke(*status_args)
    assert result.exit_code == 0
    damaged = [line for line in result.output.splitlines() if line.startswith("damaged: ")]
    assert len(damaged) == 1 and str(flipped) in damaged[0]
    assert "sppcli proposals --split test --force" in damaged[0]

    # truncated: the consumer's size check names it before any work
    truncated = items[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    pool_args = ["pool-windows", "--cache-dir", str(cache), "--split", "test", "-q",
                 *[a for s in tiny_sets(tiny_devkit) for a in ("--set", s)]]
    result = _invoke(*pool_args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {truncated} is damaged (truncated / unreadable); rebuild it with: "
                               "sppcli proposals --split test --force")
    damaged = [line for line in _invoke(*status_args).output.splitlines() if line.startswith("damaged: ")]
    assert sorted(damaged) == sorted(f"damaged: {p}  -> " + damaged[0].split("  -> ")[1] for p in (truncated, flipped))


def test_unreadable_item_in_a_stage_names_the_command_that_rebuilds_it(tiny_devkit, cache_dir, tmp_path):
    weights = tmp_path / "weights.pt"  # only its digest enters the keys: no net runs here
    weights.write_bytes(b"weights")
    planner = Planner(ArtifactStore(cache_dir), tiny_config(tiny_devkit, weights))
    proposals = planner.plan("proposals", "test")
    made, _ = _execute(planner, proposals, _fake_stage(1.0))
    item = made.item_path(planner.dataset("test").ids[0])
    size = item.stat().st_size
    item.write_bytes(b"\0" * size)  # the size check passes; h5py cannot open it
    with pytest.raises(DamagedItem) as raised:
        with open_item(item):
            pass
    assert raised.value.path == item

    pool = planner.plan("pool", "test")

    def reads_upstream(upstream, out):
        with open_item(upstream["proposals"].item_path(planner.dataset("test").ids[0])):
            pass

    features = planner.plan("features", "test")
    _execute(planner, features, _fake_stage(0.0))
    with pytest.raises(DamagedItem) as raised:
        execute(planner, pool, reads_upstream)
    assert str(raised.value) == (f"{item} is damaged (truncated / unreadable); rebuild it with: "
                                 "sppcli proposals --split test --force")


# ------------------------------------------------------------------------------------ 4. damaged manifest


def test_damaged_manifest_status_run_and_force(tiny_devkit, tmp_path, clean_proposals):
    cache = tmp_path / "cache"
    assert _invoke(*_proposals_args(tiny_devkit, cache)).exit_code == 0
    manifest = _run_dir(cache) / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])

    status = _invoke("status", "--cache-dir", str(cache), *[a for s in tiny_sets(tiny_devkit) for a in ("--set", s)])
    assert status.exit_code == 0, status.output
    assert f"damaged: {manifest}" in status.output

    result = _invoke(*_proposals_args(tiny_devkit, cache))
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {manifest} is damaged; rerun with --force to rebuild"

    result = _invoke(*_proposals_args(tiny_devkit, cache, "--force"))
    assert result.exit_code == 0, result.output
    assert json.loads(manifest.read_text())["complete"] is True
    rebuilt = _boxes(_run_dir(cache))
    for image_id, boxes in clean_proposals.items():
        np.testing.assert_array_equal(rebuilt[image_id], boxes)


# ------------------------------------------------------------------------------------ 5. locks


_HOLDER = """
import sys, time
from sppcli.artifacts import RunLock
held = RunLock(sys.argv[1]).acquire(wait=False)
print("locked", flush=True)
time.sleep(120)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_waits_or_fails_fast_and_a_killed_holder_never_blocks(tiny_devkit, cache_dir):
    planner = _planner(tiny_devkit, cache_dir)
    plan = planner.plan("proposals", "test")
    run_dir = planner.store.run_dir(plan.stage, plan.dataset, plan.key)
    holder = _hold(run_dir)
    try:
        with pytest.raises(RunInUse) as raised:
            RunLock(run_dir).acquire(wait=False)
        host = __import__("socket").gethostname()
        assert str(raised.value) == (f"{run_dir} is in use by pid {holder.pid} on {host}; "
                                     "rerun without --no-wait to wait")
        result = _invoke(*_proposals_args(tiny_devkit, cache_dir, "--no-wait"))
        assert result.exit_code == 1 and result.output.strip() == f"Error: {raised.value}"

        said: list[str] = []
        waiter = threading.Thread(target=lambda: RunLock(run_dir).acquire(wait=True, log=said.append))
        waiter.start()
        deadline = time.time() + 30
        while not said and time.time() < deadline:
            time.sleep(0.02)
        assert waiter.is_alive() and len(said) == 1
        assert re.fullmatch(rf"waiting for {re.escape(str(run_dir))}: held by pid {holder.pid} on "
                            rf"{re.escape(host)} since .+", said[0])
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
        holder.wait()
        waiter.join(30)
        assert not waiter.is_alive() and len(said) == 1
    finally:
        holder.kill()
        holder.wait()
    # the lock file of the killed holder is still there and blocks nobody
    assert RunLock(run_dir).path.exists()
    _execute(planner, plan, _fake_stage(1.0), wait=False)


# ------------------------------------------------------------------------------------ 6. Ctrl-C


def test_ctrl_c_exits_130_with_progress(tiny_devkit, tmp_path, monkeypatch):
    import sppcli.stages.proposals as proposals

    original = proposals._propose_image
    calls = {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(proposals, "_propose_image", interrupted)
    cache = tmp_path / "cache"
    result = _invoke(*_proposals_args(tiny_devkit, cache))
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == [
        "interrupted after 2 of 6 images; run the same command again to resume"]


def test_status_of_runs_that_stopped_before_finishing(tiny_devkit, cache_dir, monkeypatch):
    from sppcli.artifacts import StageRun
    from sppcli.status import format_status, pipeline_status

    planner = _planner(tiny_devkit, cache_dir)
    plan = planner.plan("proposals", "test")

    def finish_fails(self, *a, **kw):
        raise RuntimeError("finish failed")

    monkeypatch.setattr(StageRun, "finish", finish_fails)
    with pytest.raises(RuntimeError):
        _execute(planner, plan, _fake_stage(1.0))
    monkeypatch.undo()
    assert planner.state(plan).reasons == (
        "started, not finished (6 of 6 images written; the stage failed or was stopped before finishing)",)

    whole = planner.plan("bbox_reg")  # a whole-stage stage: no items to count
    planner.store.run_dir(whole.stage, whole.dataset, whole.key).mkdir(parents=True)
    assert planner.state(whole).reasons == ("started, not finished",)
    text = format_status(pipeline_status(planner, ["pool5"]))
    assert "started, not finished" in text and "of ? images" not in text


def test_ctrl_c_in_a_whole_stage_says_what_it_can(tiny_devkit, cache_dir, tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"weights")
    planner = Planner(ArtifactStore(cache_dir), tiny_config(tiny_devkit, weights))
    for stage in ("proposals", "features", "pool"):
        _execute(planner, planner.plan(stage), _fake_stage(0.0))
    whole = planner.plan("bbox_reg")  # a whole-stage run: pool + features upstream

    def stopped(upstream, out):
        raise KeyboardInterrupt

    def stopped_in_epoch_3(upstream, out):
        out.track_progress(lambda: (3, 10), "epochs")
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"^interrupted; run the same command again to resume$"):
        execute(planner, whole, stopped)
    with pytest.raises(Interrupted, match=r"^interrupted after 3 of 10 epochs; run the same command again"):
        execute(planner, whole, stopped_in_epoch_3)
    assert planner.state(whole).reasons == ("started, not finished",)
