"""Stage "features": conv5 maps of whole images, and the net behind them."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from sppcli.artifacts import ArtifactStore
from sppcli.nets.net_source import load_net_for_features, resolve_net_source
from sppcli.nets.checkpoint import load_checkpoint, save_checkpoint
from sppcli.nets.sppnet import preprocess
from sppcli.ops.geometry import scaled_size
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import features
from tests.conftest import tiny_config

CPU = RunOptions(device="cpu", workers=0)


def run_features(cache: Path, config, split="trainval", options=CPU, force=False):
    planner = Planner(ArtifactStore(cache), config)
    return run_stage(planner, features, planner.plan("features", split), options, force=force)


def read_maps(manifest, image_id) -> list[np.ndarray]:
    with h5py.File(manifest.item_path(image_id), "r") as f:
        return [features.read_map(f, f"conv5_{i}") for i in range(len(f.attrs["scales"]))]


def all_maps(manifest, ids) -> dict[str, list[np.ndarray]]:
    return {i: read_maps(manifest, i) for i in ids}


@pytest.fixture(params=["tiny", "elephants"])
def devkit_case(request, tiny_devkit, tiny_weights):
    """(devkit, config overrides) for the synthetic devkit and the real elephant photos."""
    if request.param == "tiny":
        return tiny_devkit, ()
    elephants = request.getfixturevalue("elephants_devkit")
    return elephants, ('dataset.classes=["elephant"]',)


# ---------------------------------------------------------------------------------------------
# the stage


def test_maps_are_the_trunks_conv5_of_the_resized_image(devkit_case, tiny_weights, cache_dir):
    devkit, extra = devkit_case
    config = tiny_config(devkit, tiny_weights, "features.dtype=float32", 'features.memory_format="contiguous"', *extra)
    manifest, ran = run_features(cache_dir, config)
    assert ran and manifest.complete
    net, _, _ = load_checkpoint(tiny_weights)
    planner = Planner(ArtifactStore(cache_dir), config)
    dataset = planner.dataset("trainval")
    assert manifest.n_items == len(dataset) and len(dataset) > 0
    record = manifest.metrics["net"]
    assert record["source"] == "weights" and record["path"] == str(tiny_weights.resolve())
    geometry = net.trunk.geometry
    assert (record["channels"], record["stride"], record["offset0"], record["offset"]) == (
        net.trunk.out_channels, geometry.stride, geometry.offset0, geometry.offset)
    for key in ("conv_seconds_per_image", "decode_seconds_per_image", "peak_memory_bytes", "bytes_per_image"):
        assert manifest.metrics[key] > 0
    assert manifest.metrics["scales"] == [96, 128]

    for image_id in dataset.ids[:3]:
        image = dataset.load_image(image_id)
        height, width = image.shape[:2]
        with h5py.File(manifest.item_path(image_id), "r") as f:
            assert (f.attrs["width"], f.attrs["height"]) == (width, height)
            assert list(f.attrs["scales"]) == [96, 128]
            for i, scale in enumerate((96, 128)):
                new_w, new_h, factor = scaled_size(width, height, scale, 400)
                assert min(new_w, new_h) == scale
                assert f.attrs["scale_factors"][i] == pytest.approx(factor)
                assert list(f.attrs["scaled_sizes"][i]) == [new_w, new_h]
                # PIL's antialiased bilinear resize is the independent reference for the pixels.
                pil = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), dtype=np.int16)
                ours = features.scale_image(image, [scale], 400)[0][0].permute(1, 2, 0).numpy().astype(np.int16)
                assert np.abs(pil - ours).max() <= 2 and np.abs(pil - ours).mean() < 0.5
                stored = features.read_map(f, f"conv5_{i}")
                assert stored.dtype == np.float32
                with torch.no_grad():
                    expected = net.features(preprocess(ours.astype(np.uint8))[None])[0].numpy()
                assert stored.shape == expected.shape == (net.trunk.out_channels,
                                                          *net.trunk.feature_map_size(new_h, new_w))
                np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)


def test_channels_last_convolutions_give_the_same_maps_up_to_rounding(tiny_devkit, tiny_weights, tmp_path):
    fast, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.dtype=float32"))
    plain, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.dtype=float32",
                                                        'features.memory_format="contiguous"'))
    assert fast.metrics["memory_format"] == "channels_last" and fast.key != plain.key
    for image_id in Planner(ArtifactStore(tmp_path / "c"), tiny_config(tiny_devkit, tiny_weights)).dataset("trainval").ids:
        for a, b in zip(read_maps(fast, image_id), read_maps(plain, image_id)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    with pytest.raises(ValueError, match="memory_format"):
        features.prepare_trunk(torch.nn.Conv2d(1, 1, 1), "nhwc")


def test_sparse_and_dense_storage_hold_the_same_maps(tiny_devkit, tiny_weights, tmp_path):
    sparse, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights))
    dense, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, 'features.storage="dense"'))
    assert sparse.params["features"]["storage"] == "sparse" and sparse.key != dense.key
    ids = Planner(ArtifactStore(tmp_path / "c"), tiny_config(tiny_devkit, tiny_weights)).dataset("trainval").ids
    zeros = 0.0
    for image_id in ids:
        maps = read_maps(sparse, image_id)
        for a, b in zip(maps, read_maps(dense, image_id)):
            assert a.dtype == b.dtype == np.float16 and a.tobytes() == b.tobytes()
            zeros += float(np.mean(a == 0)) / len(ids) / len(maps)
        with h5py.File(sparse.item_path(image_id), "r") as f:
            assert isinstance(f["conv5_0"], h5py.Group) and features.map_shape(f, "conv5_0") == maps[0].shape
    assert zeros > 0.3  # ReLU maps (bytes at real map sizes: bench/bench_feature_storage.py)


def test_map_encoding_round_trips_edge_cases(tmp_path):
    cases = [np.zeros((3, 4, 5), np.float16), np.ones((2, 1, 1), np.float32),
             np.array([[[0, -0.0, 1e-8, -3]]], np.float32), np.zeros((4, 0, 3), np.float16)]
    with h5py.File(tmp_path / "m.h5", "w") as f:
        for i, m in enumerate(cases):
            features.write_map(f, f"s{i}", m, "sparse")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        for i, m in enumerate(cases):
            back = features.read_map(f, f"s{i}")
            assert back.dtype == m.dtype and back.shape == m.shape
            # -0.0 is stored as a zero: it compares equal, and pooled maxima are unchanged
            assert np.array_equal(back, m) and features.map_shape(f, f"s{i}") == m.shape
    with pytest.raises(ValueError, match="features.storage"):
        with h5py.File(tmp_path / "x.h5", "w") as f:
            features.write_map(f, "m", cases[0], "zip")


def test_float16_storage_is_close_to_float32(tiny_devkit, tiny_weights, tmp_path):
    m32, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.dtype=float32"))
    m16, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights))
    assert m16.key != m32.key and m16.params["features"]["dtype"] == "float16"
    ids = Planner(ArtifactStore(tmp_path / "c"), tiny_config(tiny_devkit)).dataset("trainval").ids
    for image_id in ids:
        for a, b in zip(read_maps(m16, image_id), read_maps(m32, image_id)):
            assert a.dtype == np.float16
            np.testing.assert_allclose(a.astype(np.float32), b, rtol=1e-3, atol=1e-4)
    assert m16.metrics["bytes_per_image"] < m32.metrics["bytes_per_image"]


def test_bf16_autocast_runs_close_to_float32(tiny_devkit, tiny_weights, tmp_path):
    exact, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.dtype=float32"))
    fast, _ = run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.dtype=float32",
                                                       "features.autocast=bf16"))
    assert fast.key != exact.key
    image_id = Planner(ArtifactStore(tmp_path / "c"), tiny_config(tiny_devkit)).dataset("trainval").ids[0]
    for a, b in zip(read_maps(fast, image_id), read_maps(exact, image_id)):
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_devkit, tiny_weights, tmp_path, monkeypatch):
    config = tiny_config(tiny_devkit, tiny_weights)
    # Uninterrupted reference, decoded by two DataLoader worker processes.
    reference, _ = run_features(tmp_path / "ref", config, options=RunOptions(device="cpu", workers=2))
    ids = list(Planner(ArtifactStore(tmp_path / "ref"), config).dataset("trainval").ids)

    written = []
    real_write = features.write_item

    def dying_write(out, sample, *args):
        if len(written) == 3:
            raise KeyboardInterrupt("killed")
        real_write(out, sample, *args)
        written.append(sample["id"])

    monkeypatch.setattr(features, "write_item", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_features(tmp_path / "run", config)
    run_dir = ArtifactStore(tmp_path / "run").run_dir("features", reference.dataset, reference.key)
    assert sorted(p.stem for p in (run_dir / "items").glob("*.h5")) == sorted(written)
    assert not (run_dir / "manifest.json").exists()

    monkeypatch.setattr(features, "write_item", real_write)
    loaded = []
    real_dataset = features.ScaledImages

    class Recording(real_dataset):
        def __init__(self, dataset, ids, *args):
            loaded.extend(ids)
            super().__init__(dataset, ids, *args)

    monkeypatch.setattr(features, "ScaledImages", Recording)
    resumed, ran = run_features(tmp_path / "run", config)
    assert ran and resumed.key == reference.key
    assert loaded == [i for i in ids if i not in written]  # only pending images are decoded
    ref_maps, got_maps = all_maps(reference, ids), all_maps(resumed, ids)
    for image_id in ids:
        for a, b in zip(got_maps[image_id], ref_maps[image_id]):
            assert a.dtype == b.dtype and np.array_equal(a, b)

    again, ran = run_features(tmp_path / "run", config)
    assert not ran and again.key == reference.key


def make_pretrain_artifact(planner: Planner, weights: Path) -> Path:
    """A complete pretrain artifact holding ``weights`` as its model.pt (the pretrain convention)."""
    plan = planner.plan("pretrain")
    out = planner.store.begin(plan.stage, plan.dataset, plan.version, plan.params, plan.upstream_keys,
                              plan.external)
    net, arch, _ = load_checkpoint(weights)
    save_checkpoint(out.dir / "model.pt", net, arch, {})
    out.finish(metrics={"checkpoint": "model.pt"})
    return out.dir / "model.pt"


def test_net_from_the_pretrain_artifact(tiny_devkit, tiny_weights, tmp_path):
    config = tiny_config(tiny_devkit)  # no features.weights: the pretrain artifact's model.pt
    planner = Planner(ArtifactStore(tmp_path / "c"), config)
    with pytest.raises(Exception, match="pretrain"):
        run_stage(planner, features, planner.plan("features"), CPU)
    model = make_pretrain_artifact(planner, tiny_weights)
    manifest, ran = run_stage(planner, features, planner.plan("features"), CPU)
    assert ran and manifest.upstream == {"pretrain": planner.plan("pretrain").key}
    assert manifest.metrics["net"]["source"] == "pretrain"
    assert manifest.metrics["net"]["path"] == str(model.resolve())
    direct, _ = run_features(tmp_path / "direct", tiny_config(tiny_devkit, tiny_weights))
    image_id = planner.dataset("trainval").ids[0]
    for a, b in zip(read_maps(manifest, image_id), read_maps(direct, image_id)):
        assert np.array_equal(a, b)
    net, arch = load_net_for_features(manifest)
    assert arch == manifest.metrics["net"]["arch"] and net.trunk.name == "zf5"


def test_torchvision_alexnet_file_loads_and_extracts(elephants_devkit, tmp_path):
    from tests.nets.test_checkpoint import ALEXNET_LAYERS, torchvision_state

    state = torchvision_state([layer for layer in ALEXNET_LAYERS if layer[0].startswith("features.")], seed=3)
    path = tmp_path / "alexnet-features.pth"
    torch.save(state, path)
    config = tiny_config(elephants_devkit, path, 'dataset.classes=["elephant"]', "net.trunk=alexnet",
                         "net.width=1.0", "features.scales=[128]")
    manifest, _ = run_features(tmp_path / "c", config)
    record = manifest.metrics["net"]
    assert record["arch"]["trunk"] == "alexnet" and record["arch"]["levels"] == [6, 3, 2, 1]
    assert record["arch"]["hidden"] == 64  # a features-only file takes fc widths from [net]
    assert (record["channels"], record["stride"]) == (256, 16)
    net, _ = load_net_for_features(manifest)
    assert torch.equal(net.trunk.features[10].weight, state["features.10.weight"])
    again, _ = load_net_for_features(manifest)  # fresh fc layers are seeded: loads agree
    assert torch.equal(net.head.fc6.weight, again.head.fc6.weight)
    dataset = Planner(ArtifactStore(tmp_path / "c"), config).dataset("trainval")
    image_id = dataset.ids[0]
    image = dataset.load_image(image_id)
    resized = features.scale_image(image, [128], config.features.max_side)[0][0]
    with torch.no_grad():
        expected = net.features(preprocess(resized.permute(1, 2, 0).contiguous().numpy())[None])[0].numpy()
    (stored,) = read_maps(manifest, image_id)
    assert stored.shape == expected.shape and stored.shape[0] == 256
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_bad_params_are_refused(tiny_devkit, tiny_weights, tmp_path):
    with pytest.raises(ValueError, match="features.dtype"):
        run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.dtype=int8"))
    with pytest.raises(ValueError, match="too small"):
        run_features(tmp_path / "c", tiny_config(tiny_devkit, tiny_weights, "features.scales=[8]"))
    with pytest.raises(FileNotFoundError, match="features.weights"):
        resolve_net_source(str(tmp_path / "missing.pt"), None)
    with pytest.raises(ValueError, match="sppcli pretrain"):
        resolve_net_source("", None)
