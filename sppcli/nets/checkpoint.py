"""Building SPP-nets from an ``arch`` dict, saving/loading them, and loading torchvision weights.

Two weight formats are read:

* **sppcli checkpoints** (written by :func:`save_checkpoint`): a ``torch.save``'d dict of
  strings and tensors only, so ``torch.load(path, weights_only=True)`` reads it::

      {"format": "sppcli-net", "format_version": 1,
       "arch": "<JSON of the arch dict>", "state_dict": {...},
       "extra_json": "<JSON of the JSON-able extras>", "extra_tensors": {name: tensor}}

  The net is rebuilt from the file alone.
* **torchvision state dicts** (``alexnet-owt-*.pth``, ``vgg16-*.pth``): plain
  ``{"features.<i>.weight": ..., "classifier.<i>.weight": ...}``.

Loading policy (the same for both, see :func:`load_torchvision_weights`):

* conv weights (``features.*``) must all be present with the net's shapes, and every key in
  the file must mean something; otherwise :class:`WeightsMismatchError` lists the missing and
  unexpected keys and the shape mismatches.
* fc layers (fc6, fc7, fc8) are loaded when their shapes match the net, otherwise skipped as a
  whole layer and listed in the returned :class:`LoadReport`. The SPP layer changes fc6's input
  length: torchvision's fc6 takes pool5 = C x 6 x 6 (AlexNet, 9216) or C x 7 x 7 (VGG-16, 25088),
  channel-major, which is exactly an SPP net with ``levels=[6]`` / ``levels=[7]``; with the
  paper's ``[6, 3, 2, 1]`` (C x 50) fc6 is skipped and starts fresh. fc8 is skipped when
  ``num_classes`` differs from the file's.
* an sppcli checkpoint loaded with its own arch is loaded strictly (every key, every shape).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from sppcli.artifacts import atomic_path
from sppcli.nets.heads import FcHead
from sppcli.nets.spp_layer import SPP_MODES, bins
from sppcli.nets.sppnet import SppNet
from sppcli.nets.trunks import TRUNK_NAMES, AlexNetTrunk, Trunk, VGG16Trunk, build_trunk, trunk_class

CHECKPOINT_FORMAT = "sppcli-net"
CHECKPOINT_VERSION = 1

ARCH_DEFAULTS: dict[str, Any] = {
    "trunk": "zf5",
    "width": 1.0,
    "levels": [6, 3, 2, 1],
    "hidden": 4096,
    "num_classes": 1000,
    "spp_mode": "paper",
    "dropout": 0.5,
}
"""Every arch key with its default. ``num_classes`` may be ``None`` (no fc8)."""

_MAX_LISTED = 10
log = logging.getLogger(__name__)


class WeightsMismatchError(ValueError):
    """A weights file does not fit the net; the message names the offending keys."""


@dataclasses.dataclass
class LoadReport:
    """What a weights transfer did.

    Attributes:
        source: ``"sppcli"`` or ``"torchvision"``.
        loaded: keys (in the file's naming) copied into the net.
        skipped: ``(key, reason)`` for fc parameters left at their fresh initialisation.
    """

    source: str
    loaded: list[str]
    skipped: list[tuple[str, str]]

    def summary(self) -> str:
        text = f"{self.source} weights: {len(self.loaded)} tensors loaded"
        if self.skipped:
            text += f", {len(self.skipped)} skipped: " + "; ".join(f"{k} ({why})" for k, why in self.skipped)
        return text


@dataclasses.dataclass
class LoadedNet:
    """Result of :func:`load_weights`: the net, its (normalised) arch, extras, and the report."""

    net: SppNet
    arch: dict[str, Any]
    extra: dict[str, Any]
    report: LoadReport


# ---------------------------------------------------------------------------------------------
# arch


def normalize_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``arch``, fill in defaults, and return it as JSON-able primitives.

    Raises:
        ValueError: on an unknown key (naming the known ones) or a bad value.
    """
    unknown = sorted(set(arch) - set(ARCH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown arch key(s) {unknown}; known keys: {', '.join(ARCH_DEFAULTS)}")
    merged = {**ARCH_DEFAULTS, **arch}
    if merged["trunk"] not in TRUNK_NAMES:
        raise ValueError(f"arch trunk {merged['trunk']!r} unknown; known trunks: {', '.join(TRUNK_NAMES)}")
    if merged["spp_mode"] not in SPP_MODES:
        raise ValueError(f"arch spp_mode {merged['spp_mode']!r} unknown; known modes: {', '.join(SPP_MODES)}")
    levels = merged["levels"]
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"arch levels must be a list of positive ints, got {levels!r}")
    levels = [int(n) for n in levels]
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"arch levels must be a non-empty list of positive ints, got {levels!r}")
    width = float(merged["width"])
    hidden = int(merged["hidden"])
    dropout = float(merged["dropout"])
    num_classes = merged["num_classes"]
    if num_classes is not None:
        num_classes = int(num_classes)
    if width <= 0 or hidden < 1 or not 0 <= dropout < 1 or (num_classes is not None and num_classes < 1):
        raise ValueError(
            f"arch needs width > 0, hidden >= 1, 0 <= dropout < 1, num_classes >= 1 or None; got {merged!r}"
        )
    return {
        "trunk": str(merged["trunk"]),
        "width": width,
        "levels": levels,
        "hidden": hidden,
        "num_classes": num_classes,
        "spp_mode": str(merged["spp_mode"]),
        "dropout": dropout,
    }


def build_net(arch: Mapping[str, Any]) -> SppNet:
    """A freshly initialised :class:`SppNet` for ``arch`` (see :data:`ARCH_DEFAULTS`)."""
    arch = normalize_arch(arch)
    trunk = build_trunk(arch["trunk"], width=arch["width"])
    head = FcHead(
        trunk.out_channels * bins(arch["levels"]),
        hidden=arch["hidden"],
        dropout=arch["dropout"],
        num_outputs=arch["num_classes"],
    )
    return SppNet(trunk, arch["levels"], head, spp_mode=arch["spp_mode"])


def arch_of(net: SppNet) -> dict[str, Any]:
    """The arch dict that rebuilds ``net``'s structure."""
    return normalize_arch(
        {
            "trunk": net.trunk.name,
            "width": net.trunk.width,
            "levels": list(net.levels),
            "hidden": net.head.hidden,
            "num_classes": net.head.num_outputs,
            "spp_mode": net.spp.mode,
            "dropout": net.head.dropout.p,
        }
    )


# ---------------------------------------------------------------------------------------------
# sppcli checkpoints


def save_checkpoint(
    path: str | os.PathLike, net: SppNet, arch: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``net``'s weights, its arch and ``extra`` to ``path`` atomically.

    Args:
        path: destination; written under a temporary name, then renamed into place.
        net: the net to save.
        arch: the arch it was built from; must describe ``net`` (checked).
        extra: name -> tensor, numpy array (saved as a tensor, read back as a tensor), or a
            JSON-able value (numbers, strings, lists, dicts, None).

    Raises:
        ValueError: ``arch`` does not describe ``net``, or an extra is neither a tensor nor
            JSON-able.
    """
    arch = normalize_arch(arch)
    actual = arch_of(net)
    if actual != arch:
        differing = {k: (arch[k], actual[k]) for k in arch if arch[k] != actual[k]}
        raise ValueError(f"arch does not describe the net; (given, actual): {differing}")
    extra_tensors: dict[str, torch.Tensor] = {}
    extra_json: dict[str, Any] = {}
    for name, value in (extra or {}).items():
        if not isinstance(name, str):
            raise ValueError(f"extra keys must be strings, got {name!r}")
        if isinstance(value, torch.Tensor):
            extra_tensors[name] = value.detach().cpu()
        elif isinstance(value, np.ndarray):
            extra_tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            try:
                json.dumps(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"extra {name!r} is neither a tensor nor JSON-able: {error}") from None
            extra_json[name] = value
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "arch": json.dumps(arch, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra_json": json.dumps(extra_json, sort_keys=True),
        "extra_tensors": extra_tensors,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The tensors of a weights file: a ``torch.save``'d dict (read with ``weights_only``) or a
    safetensors file. Anything else is one ValueError naming the file and what it holds."""
    try:
        try:
            # Memory-mapping spares a second in-memory copy of a 500 MB VGG-16 file while its
            # tensors are copied into the net; legacy (pre-zip) torch files cannot be mapped.
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses to build classes: a torch.save(model) file names its module's.
        if "Unsupported global" in str(error) or "GLOBAL" in str(error):
            raise ValueError(f"{path} holds a pickled model, not a state dict; save "
                             "model.state_dict() instead") from None
        return _safetensors_load(path, map_location)
    except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, OSError) as error:
        if isinstance(error, (FileNotFoundError, IsADirectoryError)):
            raise
        return _safetensors_load(path, map_location)


def _safetensors_load(path: str | os.PathLike, map_location: str | torch.device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise ValueError(f"{path} is not a PyTorch or safetensors weights file") from None


def _is_sppcli_checkpoint(payload: Any) -> bool:
    return isinstance(payload, Mapping) and "arch" in payload and "state_dict" in payload


def _read_sppcli(payload: Mapping[str, Any], path: str | os.PathLike) -> tuple[dict, dict, dict]:
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {payload.get('format')!r} version {payload.get('format_version')!r}; "
            f"this sppcli reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}"
        )
    arch = normalize_arch(json.loads(payload["arch"]))
    extra = {**json.loads(payload.get("extra_json", "{}")), **payload.get("extra_tensors", {})}
    return arch, dict(payload["state_dict"]), extra


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[SppNet, dict[str, Any], dict[str, Any]]:
    """Rebuild the net saved by :func:`save_checkpoint` from the file alone.

    Returns:
        ``(net, arch, extra)``: the net in eval mode on ``map_location``, its arch dict, and
        the extras (tensors come back as tensors, numpy arrays as tensors too).
    """
    payload = _torch_load(path, map_location)
    if not _is_sppcli_checkpoint(payload):
        raise ValueError(f"{path} is not an sppcli checkpoint (no 'arch'/'state_dict' keys)")
    arch, state, extra = _read_sppcli(payload, path)
    net = build_net(arch).to(map_location)
    _transfer(net, state, _identity_names(), source="sppcli", where=str(path), lenient_head=False)
    return net.eval(), arch, extra


# ---------------------------------------------------------------------------------------------
# torchvision files


@dataclasses.dataclass(frozen=True)
class _Naming:
    """Translation between a file's parameter names and the net's state-dict names."""

    to_net: Callable[[str], str | None]
    to_file: Callable[[str], str]


def _identity_names() -> _Naming:
    return _Naming(to_net=lambda key: key, to_file=lambda key: key)


def _torchvision_names(trunk: Trunk) -> _Naming:
    if trunk.torchvision_classifier is None:
        torchvision_trunks = [n for n in TRUNK_NAMES if trunk_class(n).torchvision_classifier is not None]
        raise ValueError(
            f"the {trunk.name} trunk has no torchvision counterpart; torchvision weights fit "
            f"only {' and '.join(torchvision_trunks)} nets"
        )
    head_of = {prefix: layer for layer, prefix in trunk.torchvision_classifier.items()}

    def to_net(key: str) -> str | None:
        if key.startswith("features."):
            return "trunk." + key
        prefix, _, param = key.rpartition(".")
        return f"head.{head_of[prefix]}.{param}" if prefix in head_of else None

    def to_file(key: str) -> str:
        if key.startswith("trunk."):
            return key[len("trunk.") :]
        _, layer, param = key.split(".")
        return f"{trunk.torchvision_classifier[layer]}.{param}"

    return _Naming(to_net=to_net, to_file=to_file)


def _listing(title: str, items: list[str], separator: str = ", ") -> str:
    shown = separator.join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def _layer(key: str) -> str:
    return key.rpartition(".")[0]


def _transfer(
    net: SppNet,
    incoming: Mapping[str, torch.Tensor],
    naming: _Naming,
    *,
    source: str,
    where: str,
    lenient_head: bool,
) -> LoadReport:
    """Copy ``incoming`` (file naming) into ``net`` under the module's loading policy.

    With ``lenient_head`` an fc layer that is absent from the file, absent from the net, or of
    another shape is skipped whole (``head.fc6`` keeps its fresh weights *and* bias); without
    it, and always for the trunk, every such case is an error.
    """
    net_state = net.state_dict()
    accepted: dict[str, str] = {}  # net key -> file key
    present: set[str] = set()  # net keys the file has, whatever their shape
    unexpected: list[str] = []
    mismatched: list[str] = []
    head_skips: dict[str, str] = {}  # net layer, e.g. "head.fc6" -> reason
    for file_key, tensor in incoming.items():
        net_key = naming.to_net(file_key)
        lenient = lenient_head and net_key is not None and net_key.startswith("head.")
        if net_key is None or (net_key not in net_state and not lenient):
            unexpected.append(file_key)
            continue
        if net_key not in net_state:
            head_skips[_layer(net_key)] = f"the net has no {_layer(net_key).split('.')[-1]}"
            continue
        present.add(net_key)
        got, want = tuple(tensor.shape), tuple(net_state[net_key].shape)
        if got == want:
            accepted[net_key] = file_key
        elif lenient:
            head_skips[_layer(net_key)] = f"shape {got} in file, {want} in net"
        else:
            mismatched.append(f"{file_key}: {got} in file, {want} in net")
    missing = []
    for net_key in net_state:
        if net_key in present:
            continue
        if lenient_head and net_key.startswith("head."):
            head_skips.setdefault(_layer(net_key), "not in file")
        else:
            missing.append(naming.to_file(net_key))
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(
            f"{source} weights in {where} do not fit the {net.trunk.name} net "
            f"(width {net.trunk.width}, levels {list(net.levels)}, hidden {net.head.hidden}, "
            f"num_classes {net.head.num_outputs}):"
            + (_listing("missing keys", missing) if missing else "")
            + (_listing("unexpected keys", unexpected) if unexpected else "")
            + (_listing("shape mismatches", mismatched, separator="; ") if mismatched else "")
        )
    loaded = {k: v for k, v in accepted.items() if _layer(k) not in head_skips}
    net.load_state_dict({**net_state, **{k: incoming[v] for k, v in loaded.items()}}, strict=True)
    skipped = [(naming.to_file(k), head_skips[_layer(k)]) for k in net_state if _layer(k) in head_skips]
    skipped += [
        (file_key, head_skips[_layer(net_key)])
        for file_key in incoming
        if (net_key := naming.to_net(file_key)) is not None
        and net_key not in net_state
        and _layer(net_key) in head_skips
    ]
    return LoadReport(source=source, loaded=list(loaded.values()), skipped=skipped)


def _read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "the given state dict"
    payload = _torch_load(source)
    if not isinstance(payload, Mapping):
        raise ValueError(f"{source}: expected a state dict, found {type(payload).__name__}")
    return dict(payload), str(source)


def load_torchvision_weights(
    net: SppNet, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Load a torchvision AlexNet / VGG-16 state dict into an SPP-net with the same trunk.

    ``features.<i>.*`` go to ``net.trunk.features.<i>.*``; torchvision's classifier Linear
    layers go to fc6 / fc7 / fc8 (``classifier.1/4/6`` for AlexNet, ``classifier.0/3/6`` for
    VGG-16) when their shapes fit, else they are skipped (see the module docstring).

    Args:
        net: an :class:`SppNet` with an ``alexnet`` or ``vgg16`` trunk (width 1.0 for real
            torchvision files).
        source: path of a ``torch.save``'d plain state dict, or the state dict itself.

    Returns:
        a :class:`LoadReport` listing loaded and skipped keys (torchvision naming).

    Raises:
        WeightsMismatchError: conv keys missing, unknown keys, or conv shape mismatches; the
            message lists the first 10 of each.
    """
    state, where = _read_state_dict(source)
    return _transfer(net, state, _torchvision_names(net.trunk), source="torchvision", where=where, lenient_head=True)


def _torchvision_trunk_name(state: Mapping[str, torch.Tensor]) -> str | None:
    feature_keys = {k for k in state if k.startswith("features.")}
    for cls in (AlexNetTrunk, VGG16Trunk):
        # Parameter names do not depend on the width; the thinnest trunk is the cheapest to build.
        reference = cls(width=1e-3)
        if feature_keys == {k for k in reference.state_dict() if k.startswith("features.")}:
            return cls.name
    return None


def _arch_from_torchvision(state: Mapping[str, torch.Tensor], override: Mapping[str, Any]) -> dict[str, Any]:
    trunk_name = override.get("trunk") or _torchvision_trunk_name(state)
    if trunk_name is None:
        raise ValueError(
            "cannot tell whether the torchvision file holds AlexNet or VGG-16 weights from its features.* "
            "keys; pass arch_override={'trunk': 'alexnet'} or {'trunk': 'vgg16'}"
        )
    arch: dict[str, Any] = {"trunk": trunk_name}
    classifier = trunk_class(trunk_name).torchvision_classifier
    if classifier is not None:
        fc7 = state.get(classifier["fc7"] + ".weight")
        fc8 = state.get(classifier["fc8"] + ".weight")
        if fc7 is not None:
            arch["hidden"] = int(fc7.shape[0])
        if fc8 is not None:
            arch["num_classes"] = int(fc8.shape[0])
    return normalize_arch({**arch, **override})


def load_weights(
    path: str | os.PathLike,
    arch_override: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedNet:
    """Build a net and load ``path`` into it, whichever of the two formats it is.

    An sppcli checkpoint (it has an ``"arch"`` key) rebuilds its own arch; ``arch_override``
    entries replace stored ones, and fc layers whose shapes then differ (e.g. a new
    ``num_classes``) are skipped and start fresh instead of failing. A torchvision state dict
    gets its trunk from its ``features.*`` keys, hidden/num_classes from its classifier, the
    rest from :data:`ARCH_DEFAULTS`, then ``arch_override``.

    Returns:
        :class:`LoadedNet` with the net in eval mode on ``map_location``.
    """
    override = dict(arch_override or {})
    payload = _torch_load(path)
    if _is_sppcli_checkpoint(payload):
        stored_arch, state, extra = _read_sppcli(payload, path)
        arch = normalize_arch({**stored_arch, **override})
        net = build_net(arch)
        report = _transfer(
            net, state, _identity_names(), source="sppcli", where=str(path), lenient_head=arch != stored_arch
        )
    elif isinstance(payload, Mapping) and payload and all(
        isinstance(k, str) and k.startswith(("features.", "classifier.")) for k in payload
    ):
        arch = _arch_from_torchvision(payload, override)
        net = build_net(arch)
        report = load_torchvision_weights(net, payload)
        extra = {}
    else:
        keys = list(payload)[:5] if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(
            f"{path} is neither an sppcli checkpoint (no 'arch' key) nor a torchvision state dict "
            f"(features.* / classifier.* keys); it starts with {keys}"
        )
    return LoadedNet(net=net.to(map_location).eval(), arch=arch, extra=extra, report=report)
