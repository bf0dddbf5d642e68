"""Stage "pretrain": training an SPP-net classifier on object crops or a folder."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sppcli.artifacts import ArtifactStore
from sppcli.data.voc import VocDataset
from sppcli.nets import load_checkpoint
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import pretrain
from tests.conftest import tiny_config

# ~20 crops of the tiny devkit; the evaluation at 48 px keeps each run around a second.
FAST = ("pretrain.epochs=3", "pretrain.sizes=[48, 40]", "pretrain.batch_size=8", "pretrain.holdout_fraction=0.25")


def _run(cache, config):
    planner = Planner(ArtifactStore(cache), config)
    return run_stage(planner, pretrain, planner.plan("pretrain"), RunOptions(device="cpu", workers=1),
                     log=lambda msg: None)


def test_plateau_schedule_hand_worked():
    s = pretrain.PlateauSchedule(lr=0.1, patience=2, min_lr=0.0005)
    divided = [s.step(e) for e in (0.5, 0.4, 0.4, 0.45, 0.3, 0.31, 0.32, 0.33, 0.34)]
    # 0.4 twice without improvement -> /10 at the 4th epoch; 0.3 new best; two more bad -> /10;
    # two more bad -> /10 (0.0001 < min_lr: finished)
    assert divided == [False, False, False, True, False, False, True, False, True]
    assert math.isclose(s.lr, 1e-4) and s.finished
    restored = pretrain.PlateauSchedule(lr=1, patience=2, min_lr=0)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def test_rng_state_round_trip():
    import random

    state = pretrain.rng_state("cpu")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    pretrain.set_rng_state(state, "cpu")
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ---------------------------------------------------------------------------------------------
# the stage


def test_pretrain_crops_multi_size(tiny_devkit, tmp_path):
    config = tiny_config(tiny_devkit, None, *FAST)
    manifest, ran = _run(tmp_path / "cache", config)
    assert ran and manifest.complete
    m = manifest.metrics
    assert m["checkpoint"] == "model.pt"
    assert m["classes"] == list(VocDataset(tiny_devkit, "trainval").classes)
    # one full epoch per size, alternating
    assert [h["size"] for h in m["history"]] == [48, 40, 48]
    assert all(0 <= h["train_error"] <= 1 and 0 <= h["heldout_error"] <= 1 and h["loss"] > 0 for h in m["history"])
    table = m["eval_table"]
    assert table["size"] == 48 and table["n_images"] == m["n_heldout"] > 0
    assert set(table["top1_error"]) == set(pretrain.EVAL_VIEWS)
    assert all(0 <= v <= 1 for v in table["top1_error"].values())
    text = pretrain.format_eval_table(m)
    for view in pretrain.EVAL_VIEWS:
        assert view in text

    path = manifest.dir / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert "state_dict" in payload
    net, arch, extra = load_checkpoint(path)
    assert arch["num_classes"] == len(m["classes"]) and arch["hidden"] == config.net.hidden
    assert arch["width"] == config.net.width and arch["levels"] == list(config.net.levels)
    assert extra["classes"] == m["classes"]
    # the rebuilt net classifies a non-square full image
    logits = net(torch.zeros(1, 3, 48, 70))
    assert logits.shape == (1, len(m["classes"]))
    assert torch.load(manifest.dir / "train_state.pt", map_location="cpu", weights_only=True)["epoch"] == 3

    # up to date: a second run does nothing
    again, ran_again = _run(tmp_path / "cache", config)
    assert not ran_again and again.key == manifest.key


def test_single_size_trains_at_one_size(tiny_devkit, tmp_path):
    config = tiny_config(tiny_devkit, None, *FAST, "pretrain.sizes=[40]", "pretrain.epochs=2")
    manifest, _ = _run(tmp_path / "cache", config)
    assert [h["size"] for h in manifest.metrics["history"]] == [40, 40]
    assert manifest.metrics["eval_table"]["size"] == 40


def test_resume_after_kill_gives_the_uninterrupted_weights(tiny_devkit, tmp_path, monkeypatch):
    config = tiny_config(tiny_devkit, None, *FAST, "pretrain.epochs=2")
    straight, _ = _run(tmp_path / "a", config)

    real = pretrain.train_one_epoch
    calls = []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", config)
    monkeypatch.setattr(pretrain, "train_one_epoch", real)
    run_dir = tmp_path / "b" / straight.dir.relative_to(tmp_path / "a")
    assert not (run_dir / "manifest.json").exists()
    assert torch.load(run_dir / "train_state.pt", weights_only=True)["epoch"] == 1

    # move the global RNGs on: the resumed run must restore them from the saved state
    torch.manual_seed(999)
    resumed, ran = _run(tmp_path / "b", config)
    assert ran and resumed.key == straight.key
    a = torch.load(straight.dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.dir / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert strip(resumed.metrics["history"]) == strip(straight.metrics["history"])
    assert resumed.metrics["eval_table"] == straight.metrics["eval_table"]


def _write_folder(root):
    """Two classes of 5 images each, of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("bright", "dark")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            h, w = int(rng.integers(30, 60)), int(rng.integers(30, 90))
            base = 200 if c == 0 else 40
            pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "bright" / "notes.txt").write_text("not an image")


def test_pretrain_from_image_folder(tiny_devkit, tmp_path):
    folder = tmp_path / "folder"
    _write_folder(folder)
    config = tiny_config(tiny_devkit, None, *FAST, "pretrain.source=folder", f"pretrain.folder={str(folder)!r}",
                         "pretrain.epochs=2", "pretrain.holdout_fraction=0.2")
    manifest, _ = _run(tmp_path / "cache", config)
    m = manifest.metrics
    assert m["classes"] == ["bright", "dark"]
    assert m["n_train"] == 8 and m["n_heldout"] == 2
    net, arch, extra = load_checkpoint(manifest.dir / "model.pt")
    assert arch["num_classes"] == 2 and extra["classes"] == ["bright", "dark"]
    assert set(m["eval_table"]["top1_error"]) == set(pretrain.EVAL_VIEWS)
