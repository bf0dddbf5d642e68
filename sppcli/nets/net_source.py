"""The net behind a features artifact: which weights file it comes from, and loading it.

The features stage runs a conv trunk over whole images; later stages (fine-tuning, SVMs on fc6 /
fc7, classification) need the fc head *of the same net*. Both go through this module, so "the
net of this features artifact" has one meaning:

* :func:`resolve_net_source` picks the weights file: ``features.weights`` if set (an sppcli
  checkpoint or a torchvision-format AlexNet / VGG-16 state dict), else the ``model.pt`` that
  the upstream pretrain artifact names in ``metrics["checkpoint"]``.
* :func:`load_net` loads it. For a torchvision file the arch comes from ``[net]`` (trunk,
  pyramid levels, dropout; fc width too if the file has no classifier); fc layers that the file
  cannot fill (fc6 of an SPP pyramid) start from a *seeded* initialisation, so loading the same
  file twice gives the same net.
* :func:`load_net_for_features` rebuilds exactly that net from a features manifest's
  ``metrics["net"]`` record.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sppcli.nets.checkpoint import _torch_load, load_weights
from sppcli.nets.sppnet import SppNet

# Seed for fc layers a weights file does not provide (e.g. fc6 of an SPP pyramid on torchvision
# weights): without it two loads of one file would disagree on fc6.
FRESH_LAYER_SEED = 0
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NetSource:
    """Which weights a features artifact uses.

    Attributes:
        kind: ``"pretrain"`` (the pretrain artifact's checkpoint) or ``"weights"`` (a user file).
        path: absolute path of the weights file.
    """

    kind: str
    path: Path


def resolve_net_source(weights: str, pretrain: Any | None) -> NetSource:
    """The weights file for a features run.

    Args:
        weights: ``features.weights``; a path, or ``""`` for the pretrain artifact.
        pretrain: the upstream pretrain :class:`~sppcli.artifacts.Manifest` (used when
            ``weights`` is empty); its ``metrics["checkpoint"]`` names the checkpoint relative
            to its run directory (``model.pt``).

    Raises:
        FileNotFoundError: the file does not exist. ValueError: neither source is available.
    """
    if weights:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"features.weights = {weights!r}: no such file")
        return NetSource("weights", path)
    if pretrain is None:
        raise ValueError("features needs a net: set features.weights to a checkpoint or torchvision file, "
                         "or run `sppcli pretrain` first")
    name = pretrain.metrics.get("checkpoint")
    if not name:
        raise ValueError(f"pretrain artifact {pretrain.dir} records no checkpoint in its metrics")
    path = (Path(pretrain.dir) / name).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"pretrain checkpoint {path} is missing; run `sppcli pretrain --force`")
    return NetSource("pretrain", path)


def arch_override_for(net_params: Any, file_has_fc: bool = True) -> dict[str, Any]:
    """Arch entries ``[net]`` imposes on a torchvision file.

    The file fixes the channel counts, and fc7's width when it holds a classifier; ``[net]``
    gives the trunk, the pyramid, dropout, and ``hidden`` for a features-only file.
    """
    override = {"trunk": net_params.trunk, "levels": [int(n) for n in net_params.levels],
                "dropout": float(net_params.dropout)}
    if not file_has_fc:
        override["hidden"] = int(net_params.hidden)
    return override


def load_net(path: Path | str, arch_override: Mapping[str, Any] | None = None,
             map_location: str | torch.device = "cpu") -> tuple[SppNet, dict[str, Any]]:
    """Load an sppcli checkpoint or torchvision state dict; returns ``(net in eval mode, arch)``.

    Args:
        path: the weights file.
        arch_override: arch entries to impose (see :func:`sppcli.nets.checkpoint.load_weights`);
            ``None`` keeps an sppcli checkpoint's own arch.
        map_location: device of the returned net.

    Layers the file cannot fill are initialised under :data:`FRESH_LAYER_SEED` without touching
    the caller's random state, so the result depends on the file and the arch only.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(FRESH_LAYER_SEED)
        loaded = load_weights(path, arch_override=arch_override, map_location=map_location)
    _warn_skipped_layers(path, loaded.report.skipped)
    return loaded.net.eval(), loaded.arch


def _warn_skipped_layers(path: Path | str, skipped: list[tuple[str, str]]) -> None:
    """One warning naming the file's fc layers that were not loaded (they start fresh)."""
    layers: dict[str, str] = {}
    for key, why in skipped:
        layers.setdefault(key.rpartition(".")[0], why)
    if layers:
        listing = "; ".join(f"{layer} ({why})" for layer, why in layers.items())
        log.warning("%s: fc layers not loaded, they start from a fresh initialisation: %s", path, listing)


def load_source(source: NetSource, net_params: Any,
                map_location: str | torch.device = "cpu") -> tuple[SppNet, dict[str, Any]]:
    """:func:`load_net` for a features run: sppcli checkpoints keep their arch, torchvision
    files get :func:`arch_override_for` ``net_params``."""
    keys = _top_level_keys(source.path)
    if "arch" in keys and "state_dict" in keys:
        override = None
    else:
        override = arch_override_for(net_params, any(k.startswith("classifier.") for k in keys))
    net, arch = load_net(source.path, override, map_location)
    check_arch_matches(source.path, arch, net_params)
    return net, arch


#: ``[net]`` fields a weights file must agree with: they decide the conv maps and pooled windows.
CHECKED_FIELDS = ("trunk", "width", "levels")


def check_arch_matches(path: Path | str, arch: Mapping[str, Any], net_params: Any) -> None:
    """Refuse weights whose net differs from ``[net]`` rather than silently using another net.

    Raises:
        ValueError: naming each differing field with the file's and the config's value.
    """
    wanted = {"trunk": net_params.trunk, "width": float(net_params.width),
              "levels": [int(n) for n in net_params.levels]}
    built = {"trunk": arch["trunk"], "width": float(arch["width"]), "levels": [int(n) for n in arch["levels"]]}
    differing = [f"{field} {built[field]!r} in the file, {wanted[field]!r} in [net]"
                 for field in CHECKED_FIELDS if built[field] != wanted[field]]
    if differing:
        raise ValueError(f"{path} holds a net that differs from the config's [net]: {'; '.join(differing)}; "
                         "set [net] to match the file (e.g. --set net.width=...) or give other weights")


def _top_level_keys(path: Path) -> list[str]:
    payload = _torch_load(path)  # memory-mapped: a look at the keys is cheap for a 500 MB file
    return [str(k) for k in payload] if isinstance(payload, Mapping) else []


def net_record(source: NetSource, net: SppNet, arch: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metrics["net"]`` entry of a features manifest (see the stage contract)."""
    geometry = net.trunk.geometry
    return {"source": source.kind, "path": str(source.path), "arch": dict(arch),
            "channels": int(net.trunk.out_channels), "stride": int(geometry.stride),
            "offset0": float(geometry.offset0), "offset": float(geometry.offset)}


def load_net_for_features(features: Any, map_location: str | torch.device = "cpu") -> tuple[SppNet, dict[str, Any]]:
    """The net (trunk + SPP + head, eval mode) that made a features artifact, and its arch.

    Args:
        features: a features :class:`~sppcli.artifacts.Manifest`, or its ``metrics["net"]`` dict.
        map_location: device of the returned net.

    Raises:
        FileNotFoundError: the weights file recorded in the manifest is gone.
    """
    record = features if isinstance(features, Mapping) else features.metrics.get("net")
    if not record or "path" not in record or "arch" not in record:
        raise ValueError("features manifest has no metrics['net'] record; rerun `sppcli extract-features`")
    path = Path(record["path"])
    if not path.is_file():
        raise FileNotFoundError(f"the weights {path} of this features artifact are gone; restore them or "
                                "rerun `sppcli extract-features --force`")
    return load_net(path, record["arch"], map_location)
