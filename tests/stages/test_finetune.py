"""Stage "finetune" on the tiny synthetic set: windows, loss, resumption, streaming reads.

The upstream stages (proposals, features, pool) run once per session into a shared cache
(:func:`tiny_upstream`, also used by the svm and bbox_reg stage tests).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sppcli.artifacts import ArtifactStore
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import features, finetune, pool, proposals
from sppcli.detector.windows import read_pool_windows
from tests.conftest import tiny_config

CPU = RunOptions(device="cpu")
_UPSTREAM: dict[tuple, Path] = {}


def tiny_upstream(tmp_path_factory, devkit: Path, weights: Path, *overrides: str) -> Path:
    """A cache root holding complete proposals/features/pool artifacts of the train split for
    ``tiny_config(devkit, weights, *overrides)``; built once per session and argument set."""
    key = (str(devkit), str(weights), overrides)
    if key not in _UPSTREAM:
        root = tmp_path_factory.mktemp("learning_cache")
        planner = Planner(ArtifactStore(root), tiny_config(devkit, weights, *overrides))
        for module, stage in ((proposals, "proposals"), (features, "features"), (pool, "pool")):
            run_stage(planner, module, planner.plan(stage), CPU)
        _UPSTREAM[key] = root
    return _UPSTREAM[key]


def planner_for(cache: Path, devkit: Path, weights: Path, *overrides: str) -> Planner:
    return Planner(ArtifactStore(cache), tiny_config(devkit, weights, *overrides))


def pool_manifest(planner: Planner):
    """The complete pool artifact of the train split."""
    plan = planner.plan("pool")
    return planner.store.manifest("pool", plan.dataset, plan.key)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_devkit, tiny_weights) -> Path:
    return tiny_upstream(tmp_path_factory, tiny_devkit, tiny_weights)


FAST = ("finetune.lr=0.01", "finetune.iterations=60", "finetune.lr_step=50")


def _run(planner: Planner, force: bool = False):
    return run_stage(planner, finetune, planner.plan("finetune"), CPU, force=force)


def _state(manifest) -> dict[str, torch.Tensor]:
    payload = torch.load(manifest.dir / "fc.pt", map_location="cpu", weights_only=True)
    return payload["state_dict"]


def test_selected_windows_follow_the_iou_ranges(cache, tiny_devkit, tiny_weights):
    planner = planner_for(cache, tiny_devkit, tiny_weights)
    pool = pool_manifest(planner)
    ids = planner.dataset("trainval").ids
    paths = [str(pool.item_path(i)) for i in ids]
    params = planner.config.finetune
    positives, negatives = finetune.select_windows(paths, params, num_classes=8)
    assert len(positives) > 0 and len(negatives) > 0
    n_gt = 0
    for i, image_id in enumerate(ids):
        windows = read_pool_windows(Path(paths[i]))
        best = windows.overlaps.max(axis=1)
        fg = positives.row[positives.image == i]
        bg = negatives.row[negatives.image == i]
        assert (best[fg] >= 0.5).all() and ((best[bg] >= 0.1) & (best[bg] < 0.5)).all()
        np.testing.assert_array_equal(positives.label[positives.image == i], windows.overlaps[fg].argmax(1) + 1)
        # every window in range is selected, ground-truth windows included
        assert len(fg) + len(bg) == int((best >= 0.1).sum())
        assert set(np.flatnonzero(windows.is_gt)) <= set(fg.tolist())
        n_gt += int(windows.is_gt.sum())
    sampler = finetune.FinetuneSampler(positives, negatives, params.batch_size, params.fg_fraction, params.seed)
    batch = sampler.batch(0)
    assert len(batch.fg) == round(params.fg_fraction * params.batch_size) == 8
    assert len(batch.labels) == params.batch_size and (batch.labels[:8] > 0).all() and (batch.labels[8:] == 0).all()
    assert n_gt > 0


def test_loss_decreases_and_output_loads(cache, tiny_devkit, tiny_weights):
    from sppcli.nets.net_source import load_net

    planner = planner_for(cache, tiny_devkit, tiny_weights, *FAST)
    manifest, ran = _run(planner)
    assert ran
    m = manifest.metrics
    assert m["final_loss"] < 0.8 * m["initial_loss"], (m["initial_loss"], m["final_loss"])
    assert m["positives_per_batch"] == 8 and m["negatives_per_batch"] == 24
    assert m["history"][-1]["iteration"] == 60 and m["history"][-1]["lr"] == pytest.approx(0.001)
    assert m["labels"][0] == "__background__" and len(m["labels"]) == 9
    assert not (manifest.dir / finetune.RESUME).exists()
    net, arch = load_net(m["net"]["path"])
    assert arch["num_classes"] == 9 and net.head.fc8.out_features == 9
    # fc8 moved away from its N(0, 0.01) start; the trunk is the features net's, untouched
    source = torch.load(tiny_weights, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in net.state_dict().items():
        if key.startswith("trunk."):
            assert torch.equal(value, source[key]), key
    assert not torch.equal(net.head.fc7.weight, source["head.fc7.weight"])
    again, ran = _run(planner)
    assert not ran and again.key == manifest.key


def test_resume_after_a_kill_is_bit_identical(cache, tiny_devkit, tiny_weights, monkeypatch):
    # 20 iterations, checkpoint every 10 (tiny_config); killed during iteration 16
    planner = planner_for(cache, tiny_devkit, tiny_weights, "finetune.lr=0.01", "finetune.seed=5")
    reference, _ = _run(planner, force=True)
    want = _state(reference)

    real_step = finetune.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 16:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", dying_step)
    # A forced run builds beside the complete one and cannot resume; to leave a partial run of
    # this key, the complete one goes first.
    run_dir = reference.dir
    shutil.rmtree(run_dir)
    with pytest.raises(KeyboardInterrupt):
        _run(planner)
    assert not (run_dir / "manifest.json").exists() and not (run_dir / "fc.pt").exists()
    saved = torch.load(run_dir / finetune.RESUME, map_location="cpu", weights_only=True)
    assert saved["iteration"] == 10
    monkeypatch.setattr(finetune, "train_step", real_step)

    resumed, ran = _run(planner)
    assert ran and resumed.metrics["resumed_from"] == 10
    got = _state(resumed)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for metric in ("initial_loss", "final_loss", "train_accuracy_fg", "train_accuracy_bg", "history"):
        assert json.dumps(resumed.metrics[metric]) == json.dumps(reference.metrics[metric])


def test_streaming_reads_give_the_same_weights(cache, tiny_devkit, tiny_weights, monkeypatch):
    planner = planner_for(cache, tiny_devkit, tiny_weights, "finetune.lr=0.01", "finetune.seed=9")
    in_memory, _ = _run(planner, force=True)
    want = _state(in_memory)
    # a budget of one mini-batch: the reader streams, two batches per request at most
    monkeypatch.setattr(finetune, "DEFAULT_MAX_CACHE_BYTES", 32 * 1600 * 2 * 2)
    streamed, _ = _run(planner, force=True)
    assert in_memory.metrics["features_in_memory"] and not streamed.metrics["features_in_memory"]
    # what each held: every selected window's vector, or the two chunks in flight (within the budget)
    windows = in_memory.metrics["positive_windows"] + in_memory.metrics["negative_windows"]
    assert in_memory.metrics["feature_cache_bytes"] == windows * 1600 * 2
    assert 0 < streamed.metrics["feature_cache_bytes"] <= 32 * 1600 * 2 * 2
    got = _state(streamed)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_bad_params_are_reported():
    from sppcli.config import FinetuneParams

    with pytest.raises(ValueError, match="bg_iou_low"):
        finetune.check_params(FinetuneParams(bg_iou_low=0.6))
    with pytest.raises(ValueError, match="iterations"):
        finetune.check_params(FinetuneParams(iterations=0))


AUGMENTED = ("finetune.flip=true", "finetune.random_scale=true")


def test_flipped_and_random_scale_samples_are_the_flipped_images_windows(tmp_path_factory, tiny_devkit, tiny_weights):
    """Each augmented sample equals, by a slow independent path, the window mirrored onto the net's
    conv5 map of the flipped image at the drawn scale, pooled by the per-window reference."""
    from sppcli.nets.checkpoint import load_checkpoint
    from sppcli.nets.sppnet import preprocess
    from sppcli.ops.geometry import window_to_cells
    from sppcli.ops.spp_pool import spp_pool_reference

    cache = tiny_upstream(tmp_path_factory, tiny_devkit, tiny_weights, *AUGMENTED)
    planner = planner_for(cache, tiny_devkit, tiny_weights, *AUGMENTED, *FAST)
    feats_plan = planner.plan("features")
    assert feats_plan.params.get("flip") is True and "flip" not in planner.plan("features", "test").params
    feats = planner.store.manifest("features", feats_plan.dataset, feats_plan.key)
    pool_m = pool_manifest(planner)
    ids = list(planner.dataset("trainval").ids)
    net, _, _ = load_checkpoint(tiny_weights)
    geometry = pool.geometry_of(feats)

    # the flipped maps are the net run on the mirrored image
    item = features.read_feature_item(feats.item_path(ids[0]))
    image = planner.dataset("trainval").load_image(ids[0])
    for s, scale in enumerate(item.scales):
        resized = features.scale_image(image, [scale], 400)[0][0].permute(1, 2, 0).numpy()
        with torch.no_grad():
            want = net.features(preprocess(np.ascontiguousarray(resized[:, ::-1]))[None])[0].numpy()
        got = features.read_scale_map(feats.item_path(ids[0]), s, flip=True)
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())

    positives, negatives = finetune.select_windows([str(pool_m.item_path(i)) for i in ids], planner.config.finetune, 8)
    selected = finetune.WindowSet.join(positives, negatives)
    reader = finetune.SelectedFeatures(pool.pooled_features_of(pool_m, feats), ids, selected, 0,
                                       finetune.SplitGeometry.of(feats, ids), flip=True, random_scale=True)
    rng = np.random.default_rng(1)
    pick = rng.choice(len(selected), 12, replace=False)
    flip = np.arange(12) % 2 == 0
    scale = rng.integers(0, 2, 12)
    got = reader.get(pick, flip, scale)
    for k, j in enumerate(pick):
        image_id = ids[selected.image[j]]
        it = features.read_feature_item(feats.item_path(image_id), load_maps=False)
        x1, y1, x2, y2 = selected.boxes[j].astype(np.float64)
        box = [it.width - x2, y1, it.width - x1, y2] if flip[k] else [x1, y1, x2, y2]
        fmap = features.read_scale_map(feats.item_path(image_id), scale[k], flip=flip[k]).astype(np.float64)
        cells = window_to_cells(torch.tensor([box], dtype=torch.float64) * it.scale_factors[scale[k]], geometry,
                                fmap.shape[1], fmap.shape[2])
        want = spp_pool_reference(torch.from_numpy(fmap), cells)[0].numpy().astype(np.float16)
        np.testing.assert_array_equal(got[k], want)
    # in memory (every variant made once) and on request agree
    cached = finetune.SelectedFeatures(pool.pooled_features_of(pool_m, feats), ids, selected, 10**9,
                                       finetune.SplitGeometry.of(feats, ids), flip=True, random_scale=True)
    assert cached.in_memory and not reader.in_memory
    assert cached.get(pick, flip, scale).tobytes() == got.tobytes()
    assert cached.get(pick).tobytes() == reader.get(pick).tobytes()

    manifest, ran = _run(planner)
    assert ran and manifest.metrics["flip"] and manifest.metrics["random_scale"]
    plain, _ = _run(planner_for(tiny_upstream(tmp_path_factory, tiny_devkit, tiny_weights), tiny_devkit, tiny_weights,
                                *FAST))
    assert not plain.metrics["flip"] and manifest.key != plain.key
