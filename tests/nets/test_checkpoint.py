"""Building nets from arch dicts, sppcli checkpoints, torchvision-format AlexNet / VGG-16 files."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sppcli.nets.checkpoint import (
    ARCH_DEFAULTS,
    WeightsMismatchError,
    build_net,
    load_checkpoint,
    load_torchvision_weights,
    load_weights,
    normalize_arch,
    save_checkpoint,
)

# torchvision's parameter names and shapes, written out from its model definitions
# (alexnet: features Conv2d at 0, 3, 6, 8, 10; classifier Linear at 1, 4, 6;
#  vgg16 configuration "D": Conv2d at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28;
#  classifier Linear at 0, 3, 6). Weights then biases.
ALEXNET_LAYERS = [
    ("features.0", (64, 3, 11, 11)),
    ("features.3", (192, 64, 5, 5)),
    ("features.6", (384, 192, 3, 3)),
    ("features.8", (256, 384, 3, 3)),
    ("features.10", (256, 256, 3, 3)),
    ("classifier.1", (4096, 256 * 6 * 6)),
    ("classifier.4", (4096, 4096)),
    ("classifier.6", (1000, 4096)),
]
_VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
              (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
              (26, 512, 512), (28, 512, 512)]
VGG16_LAYERS = [(f"features.{i}", (cout, cin, 3, 3)) for i, cin, cout in _VGG_CONVS] + [
    ("classifier.0", (4096, 512 * 7 * 7)),
    ("classifier.3", (4096, 4096)),
    ("classifier.6", (1000, 4096)),
]

TINY = {"trunk": "zf5", "width": 0.125, "levels": [6, 3, 2, 1], "hidden": 32, "num_classes": 3}


def uninitialised_net(arch):
    """``build_net`` without the cost of random initialisation: for nets whose every parameter
    is then loaded (the tests check that nothing was skipped)."""
    with torch.device("meta"):
        net = build_net(arch)
    return net.to_empty(device="cpu")


def torchvision_state(layers, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with He-scaled spread so activations stay finite through the layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layers:
        fan_in = math.prod(shape[1:])
        state[f"{name}.weight"] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator) * 0.01
    return state


def torchvision_alexnet_reference(state, images):
    """torchvision's AlexNet forward (eval mode), written with functional ops."""
    x = F.relu(F.conv2d(images, state["features.0.weight"], state["features.0.bias"], stride=4, padding=2))
    x = F.max_pool2d(x, 3, 2)
    x = F.relu(F.conv2d(x, state["features.3.weight"], state["features.3.bias"], padding=2))
    x = F.max_pool2d(x, 3, 2)
    for i in (6, 8, 10):
        x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
    conv5 = x
    x = F.adaptive_avg_pool2d(F.max_pool2d(x, 3, 2), 6).flatten(1)
    x = F.relu(F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"]))
    x = F.relu(F.linear(x, state["classifier.4.weight"], state["classifier.4.bias"]))
    return conv5, F.linear(x, state["classifier.6.weight"], state["classifier.6.bias"])


def torchvision_vgg16_conv5(state, images):
    x = images
    for i, _, _ in _VGG_CONVS:
        if i in (5, 10, 17, 24):
            x = F.max_pool2d(x, 2, 2)
        x = F.relu(F.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
    return x


# ---------------------------------------------------------------------------------------------
# arch and sppcli checkpoints


def test_normalize_arch_fills_defaults_and_names_known_keys():
    arch = normalize_arch({"trunk": "alexnet", "levels": (4, 3, 2, 1)})
    assert arch == {**ARCH_DEFAULTS, "trunk": "alexnet", "levels": [4, 3, 2, 1]}
    with pytest.raises(ValueError, match="unknown arch key.*'depth'.*known keys: trunk, width"):
        normalize_arch({"depth": 5})
    with pytest.raises(ValueError, match="known trunks"):
        normalize_arch({"trunk": "resnet"})
    with pytest.raises(ValueError, match="levels"):
        normalize_arch({"levels": []})


def test_checkpoint_round_trip_from_file_alone(tmp_path):
    torch.manual_seed(0)
    net = build_net(TINY).eval()
    path = tmp_path / "sub" / "net.pt"
    extra = {"epoch": 3, "history": [0.5, 0.25], "mean_norm": torch.tensor([20.0]), "counts": np.arange(4)}
    save_checkpoint(path, net, TINY, extra)
    assert sorted(os.listdir(path.parent)) == ["net.pt"]  # the temporary file was renamed away

    raw = torch.load(path, weights_only=True)  # strings and tensors only
    assert raw["format"] == "sppcli-net" and isinstance(raw["arch"], str)

    loaded, arch, got_extra = load_checkpoint(path)
    assert arch == normalize_arch(TINY)
    assert not loaded.training
    images = torch.randn(2, 3, 96, 80)
    assert torch.equal(loaded(images), net(images))
    assert got_extra["epoch"] == 3 and got_extra["history"] == [0.5, 0.25]
    assert torch.equal(got_extra["mean_norm"], torch.tensor([20.0]))
    assert torch.equal(got_extra["counts"], torch.arange(4))


def test_save_overwrites_and_checks_arch_and_extras(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(b"old")
    net = build_net({**TINY, "num_classes": None})
    save_checkpoint(path, net, {**TINY, "num_classes": None})
    assert load_checkpoint(path)[0].head.fc8 is None
    with pytest.raises(ValueError, match="does not describe the net.*hidden"):
        save_checkpoint(path, net, {**TINY, "num_classes": None, "hidden": 64})
    with pytest.raises(ValueError, match="neither a tensor nor JSON-able"):
        save_checkpoint(path, net, {**TINY, "num_classes": None}, {"bad": object()})
    assert load_checkpoint(path)[0].head.fc8 is None  # a failed save leaves the old file


def test_load_weights_with_new_num_classes_keeps_everything_else(tmp_path):
    torch.manual_seed(1)
    net = build_net(TINY)
    path = tmp_path / "net.pt"
    save_checkpoint(path, net, TINY, {"note": "pretrained"})
    loaded = load_weights(path, arch_override={"num_classes": 21})
    assert loaded.arch["num_classes"] == 21 and loaded.extra == {"note": "pretrained"}
    assert loaded.report.source == "sppcli"
    assert sorted(k for k, _ in loaded.report.skipped) == ["head.fc8.bias", "head.fc8.weight"]
    assert "(32, 32) in net" not in loaded.report.summary()
    assert torch.equal(loaded.net.head.fc7.weight, net.head.fc7.weight)
    assert torch.equal(loaded.net.trunk.features.conv1.weight, net.trunk.features.conv1.weight)
    assert loaded.net.head.fc8.weight.shape == (21, 32)
    # without an override everything loads strictly
    assert load_weights(path).report.skipped == []


def test_strict_checkpoint_load_reports_mismatch(tmp_path):
    net = build_net(TINY)
    path = tmp_path / "net.pt"
    save_checkpoint(path, net, TINY)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["trunk.features.conv1.weight"] = torch.zeros(5, 3, 7, 7)
    torch.save(payload, path)
    with pytest.raises(WeightsMismatchError, match=r"trunk.features.conv1.weight: \(5, 3, 7, 7\) in file"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# torchvision files


@pytest.fixture(scope="module")
def alexnet_state():
    return torchvision_state(ALEXNET_LAYERS, seed=10)


def test_alexnet_with_6x6_pyramid_equals_torchvision(alexnet_state):
    # A single 6x6 level is torchvision's pool5 at 224x224 (13x13 map, window 3, stride 2),
    # so every layer, fc6 included, loads and the logits agree.
    net = uninitialised_net({"trunk": "alexnet", "levels": [6], "num_classes": 1000}).eval()
    report = load_torchvision_weights(net, alexnet_state)
    assert report.skipped == [] and sorted(report.loaded) == sorted(alexnet_state)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    conv5, logits = torchvision_alexnet_reference(alexnet_state, images)
    with torch.no_grad():
        assert torch.allclose(net.features(images), conv5, rtol=1e-4, atol=1e-5)
        assert torch.allclose(net(images), logits, rtol=1e-4, atol=1e-4)


def test_alexnet_spp_pyramid_skips_fc6_only(alexnet_state):
    net = build_net({"trunk": "alexnet", "levels": [6, 3, 2, 1], "num_classes": 1000})
    report = load_torchvision_weights(net, alexnet_state)
    skipped = dict(report.skipped)
    assert set(skipped) == {"classifier.1.weight", "classifier.1.bias"}
    assert skipped["classifier.1.weight"] == "shape (4096, 9216) in file, (4096, 12800) in net"
    assert "classifier.4.weight" in report.loaded and "features.10.bias" in report.loaded
    assert torch.equal(net.head.fc7.weight, alexnet_state["classifier.4.weight"])
    assert not torch.equal(net.head.fc6.bias, alexnet_state["classifier.1.bias"])  # whole layer skipped


def test_load_weights_detects_a_features_only_torchvision_file(alexnet_state, tmp_path):
    path = tmp_path / "alexnet-features.pth"
    # The pre-zip serialisation of older torchvision releases (cannot be memory-mapped).
    features = {k: v for k, v in alexnet_state.items() if k.startswith("features.")}
    torch.save(features, path, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsMismatchError) as error:  # a file meant for width 1.0
        load_torchvision_weights(build_net({"trunk": "alexnet", "hidden": 64, "width": 0.5}), path)
    assert str(path) in str(error.value) and "width 0.5" in str(error.value)
    assert "features.0.weight: (64, 3, 11, 11) in file, (32, 3, 11, 11) in net" in str(error.value)
    loaded = load_weights(path, arch_override={"num_classes": 21, "hidden": 64})
    assert loaded.arch["trunk"] == "alexnet" and loaded.report.source == "torchvision"
    expected_skips = {f"classifier.{i}.{param}" for i in (1, 4, 6) for param in ("weight", "bias")}
    assert {k for k, _ in loaded.report.skipped} == expected_skips
    assert all(reason == "not in file" for _, reason in loaded.report.skipped)
    assert torch.equal(loaded.net.trunk.features[3].weight, alexnet_state["features.3.weight"])
    assert loaded.net(torch.zeros(1, 3, 100, 120)).shape == (1, 21)


def test_mismatch_error_names_keys_and_shapes(alexnet_state):
    state = dict(alexnet_state)
    del state["features.8.bias"]
    state["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    state["features.12.weight"] = torch.zeros(1)
    state["classifier.2.weight"] = torch.zeros(1)  # a ReLU slot in torchvision: nothing to load
    net = build_net({"trunk": "alexnet", "hidden": 64, "num_classes": 5})
    with pytest.raises(WeightsMismatchError) as error:
        load_torchvision_weights(net, state)
    message = str(error.value)
    assert "missing keys (1): features.8.bias" in message
    assert "unexpected keys (2): features.12.weight, classifier.2.weight" in message
    assert "shape mismatches (1): features.3.weight: (192, 64, 3, 3) in file, (192, 64, 5, 5) in net" in message


def test_mismatch_error_lists_first_ten(alexnet_state):
    vgg_names = torchvision_state(VGG16_LAYERS[:13], seed=0)  # conv keys only
    net = build_net({"trunk": "alexnet", "hidden": 64, "num_classes": 5})
    with pytest.raises(WeightsMismatchError) as error:
        load_torchvision_weights(net, vgg_names)
    message = str(error.value)
    # 26 VGG conv keys: features.0/10 exist in AlexNet (with other shapes), the other 22 do not.
    assert "missing keys (6): features.3.weight, features.3.bias, features.6.weight" in message
    assert "unexpected keys (22): features.2.weight, features.2.bias, features.5.weight" in message
    assert message.count(", ", message.index("unexpected keys"), message.index("more")) == 9
    assert "features.14.bias ... and 12 more" in message
    assert (
        "shape mismatches (2): features.0.weight: (64, 3, 3, 3) in file, (64, 3, 11, 11) in net; "
        "features.10.weight: (256, 128, 3, 3) in file, (256, 256, 3, 3) in net"
    ) in message


def test_zf5_has_no_torchvision_counterpart(alexnet_state):
    with pytest.raises(ValueError, match="only alexnet and vgg16"):
        load_torchvision_weights(build_net(TINY), alexnet_state)


def test_load_weights_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="neither an sppcli checkpoint"):
        load_weights(path)


@pytest.fixture(scope="module")
def vgg16_loaded():
    """One full-width VGG-16 net (138M parameters) with torchvision-format weights, made once."""
    state = torchvision_state(VGG16_LAYERS, seed=11)
    net = uninitialised_net({"trunk": "vgg16", "levels": [7], "num_classes": 1000}).eval()
    report = load_torchvision_weights(net, state)
    return net, state, report


def test_vgg16_loads_and_extracts_features(vgg16_loaded):
    net, state, report = vgg16_loaded
    assert report.skipped == [] and len(report.loaded) == len(state) == 32
    assert torch.equal(net.head.fc6.weight, state["classifier.0.weight"])
    assert torch.equal(net.head.fc8.bias, state["classifier.6.bias"])
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv5 = net.features(images)
        assert conv5.shape == (1, 512, 4, 4)
        assert torch.allclose(conv5, torchvision_vgg16_conv5(state, images), rtol=1e-4, atol=1e-5)
        fc7 = net.head.fc7_features(net.pooled(images))
    assert fc7.shape == (1, 4096) and torch.isfinite(fc7).all() and fc7.max() > 0
