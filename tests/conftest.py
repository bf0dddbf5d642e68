"""Shared fixtures: a tiny synthetic VOC devkit, a tiny random-weight net and a config for both.

Everything is made here, from the project's own code: no downloads, no GPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sppcli.config import Config, load_config

os.environ.setdefault("SPPCLI_NO_PROGRESS", "1")
# Two cores shared by the suite: torch's intra-op threads only fight each other here (pooling one
# image took 20x longer with 2 threads under load than with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

REPO = Path(__file__).resolve().parents[1]
ELEPHANTS = REPO.parent / "shared" / "data" / "voc-elephants" / "VOC2007"
if not ELEPHANTS.exists():  # CI lays shared/ beside the clone; a developer checkout has it one up
    ELEPHANTS = Path("/work/shared/data/voc-elephants/VOC2007")

TINY_ARCH = {"trunk": "zf5", "width": 0.125, "levels": [6, 3, 2, 1], "hidden": 64, "num_classes": 8,
             "dropout": 0.5}


@pytest.fixture(scope="session")
def elephants_devkit() -> Path:
    if not ELEPHANTS.exists():
        pytest.skip("shared/data/voc-elephants is not present")
    return ELEPHANTS


@pytest.fixture(scope="session")
def tiny_devkit(tmp_path_factory) -> Path:
    """8 trainval + 6 test synthetic images of 160 x 120."""
    from sppcli.data.synth import make_dataset

    out = tmp_path_factory.mktemp("synth") / "VOC2007"
    make_dataset(out, seed=0, n_trainval=8, n_test=6, size=(160, 120))
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A random-initialised tiny ZF-5 SPP-net checkpoint (our own format)."""
    import torch

    from sppcli.nets.checkpoint import build_net, save_checkpoint

    torch.manual_seed(0)
    net = build_net(TINY_ARCH)
    path = tmp_path_factory.mktemp("weights") / "tiny_zf5.pt"
    save_checkpoint(path, net, TINY_ARCH, {})
    return path


def tiny_config(devkit: Path, weights: Path | None = None, *overrides: str) -> Config:
    """The tiny end-to-end config used by stage tests; ``overrides`` are ``--set`` strings."""
    return load_config(None, tiny_sets(devkit, weights) + list(overrides))


def tiny_sets(devkit: Path, weights: Path | None = None) -> list[str]:
    """The ``--set`` strings of :func:`tiny_config` (for tests that drive the CLI)."""
    sets = [
        f"dataset.devkit={str(devkit)!r}",
        "net.width=0.125", "net.hidden=64",
        "proposals.max_boxes=150", "proposals.min_size=8", "proposals.max_side=200",
        "features.scales=[96, 128]", "features.max_side=400",
        "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.sizes=[64, 48]",
        "finetune.iterations=20", "finetune.lr_step=15", "finetune.batch_size=32", "finetune.checkpoint_every=10",
        "svm.retrain_limit=50",
        "classify.size=96",
    ]
    if weights is not None:
        sets.append(f"features.weights={str(weights)!r}")
    return sets


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
