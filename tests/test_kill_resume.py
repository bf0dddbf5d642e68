"""A stage killed with SIGKILL mid-run (no chance to clean up) resumes to the same result."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import REPO


def _proposals_cmd(devkit: Path, cache: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "sppcli", "proposals", "--cache-dir", str(cache), "--split", "trainval",
            "--set", f"dataset.devkit={str(devkit)!r}", "--set", f"proposals.mode={mode!r}",
            "--set", "proposals.max_side=200", "--set", "proposals.min_size=4", "-q"]


def _boxes(cache: Path) -> dict[str, np.ndarray]:
    run_dirs = [p.parent for p in cache.glob("proposals/*/*/manifest.json")]
    assert len(run_dirs) == 1
    out = {}
    items = sorted((run_dirs[0] / "items").glob("*.h5"))
    # A resumed run removes the half-written (hidden) file the kill left behind.
    assert not [p.name for p in items if p.name.startswith(".")]
    for item in items:
        with h5py.File(item, "r") as f:
            out[item.stem] = f["boxes"][()]
    return out


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, tiny_devkit):
    env = {**os.environ, "SPPCLI_NO_PROGRESS": "1"}
    killed_cache = tmp_path / "killed"
    # "quality" mode is slow enough (~0.3 s per tiny image) to be caught half-way.
    proc = subprocess.Popen(_proposals_cmd(tiny_devkit, killed_cache, "quality"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    items = []
    while time.time() < deadline and proc.poll() is None:
        items = list(killed_cache.glob("proposals/*/*/items/*.h5"))
        if len(items) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(killed_cache.glob("proposals/*/*/manifest.json")), "a killed run must not look complete"
    n_before = len(list(killed_cache.glob("proposals/*/*/items/*.h5")))
    assert 2 <= n_before < 8

    resumed = subprocess.run(_proposals_cmd(tiny_devkit, killed_cache, "quality"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    fresh_cache = tmp_path / "fresh"
    fresh = subprocess.run(_proposals_cmd(tiny_devkit, fresh_cache, "quality"), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr

    a, b = _boxes(killed_cache), _boxes(fresh_cache)
    assert a.keys() == b.keys() and len(a) == 8
    for image_id in a:
        np.testing.assert_array_equal(a[image_id], b[image_id])
