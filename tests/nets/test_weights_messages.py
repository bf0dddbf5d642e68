"""Weights files that are not what [net] says, or not weights at all: one line naming the file."""
import logging

import pytest
import torch

from sppcli.nets.checkpoint import build_net, load_weights
from sppcli.nets.net_source import NetSource, load_net, load_source
from sppcli.parallel import resolve_device
from tests.conftest import TINY_ARCH, tiny_config


def test_checkpoint_disagreeing_with_net_section_names_the_fields(tiny_devkit, tiny_weights):
    config = tiny_config(tiny_devkit, tiny_weights, "net.width=0.25", "net.levels=[4, 2, 1]")
    with pytest.raises(ValueError) as error:
        load_source(NetSource("weights", tiny_weights), config.net)
    assert str(error.value) == (
        f"{tiny_weights} holds a net that differs from the config's [net]: width 0.125 in the file, "
        "0.25 in [net]; levels [6, 3, 2, 1] in the file, [4, 2, 1] in [net]; set [net] to match the file "
        "(e.g. --set net.width=...) or give other weights")
    net, arch = load_source(NetSource("weights", tiny_weights), tiny_config(tiny_devkit, tiny_weights).net)
    assert arch["width"] == 0.125


def test_layers_not_loaded_are_one_warning(tiny_weights, caplog):
    with caplog.at_level(logging.WARNING, logger="sppcli.nets.net_source"):
        load_net(tiny_weights, {**TINY_ARCH, "num_classes": 3})
    messages = [r.getMessage() for r in caplog.records if r.name == "sppcli.nets.net_source"]
    assert messages == [f"{tiny_weights}: fc layers not loaded, they start from a fresh initialisation: "
                        "head.fc8 (shape (8,) in file, (3,) in net)"]
    caplog.clear()
    load_net(tiny_weights, None)
    assert not [r for r in caplog.records if r.name == "sppcli.nets.net_source"]


def test_pickled_whole_model_is_named(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_net(TINY_ARCH), path)
    with pytest.raises(ValueError) as error:
        load_weights(path)
    assert str(error.value) == f"{path} holds a pickled model, not a state dict; save model.state_dict() instead"
    assert "weights_only" not in str(error.value)


@pytest.mark.parametrize("content", [bytes(range(256)) * 40, b"", b"PK\x03\x04 not really a zip"])
def test_random_bytes_are_not_a_weights_file(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_weights(path)
    assert str(error.value) == f"{path} is not a PyTorch or safetensors weights file"


def test_safetensors_state_dict_is_read(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"features.0.weight": torch.zeros(2, 3)}, str(path))
    with pytest.raises(ValueError, match="cannot tell whether the torchvision file holds AlexNet or VGG-16"):
        load_weights(path)  # read as a torchvision-named state dict, then judged by its keys


def test_unknown_device_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"^--device tpu: unknown device; valid values: auto, cpu, cuda, cuda:N, mps$"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("cuda:x")
    assert resolve_device("cpu") == "cpu"


def test_cuda_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"^--device {device}: CUDA is not available on this machine .*; use --device cpu$"):
            resolve_device(device)
    assert resolve_device("auto") == "cpu"
