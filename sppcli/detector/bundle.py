"""A trained detector in one file: the net, the SVMs, the box regressors and the settings.

``sppcli export`` writes it from a pipeline's artifacts; ``sppcli predict --bundle`` runs it on
new images with nothing else at hand. The file is safetensors (tensors and a string metadata
table; loading it runs no code, unlike a pickle): every array is a tensor, everything else one
JSON document in the metadata under ``"sppcli"``.

Contents (N = the net's tensors, K classes, D the SVMs' feature length, P = C x 50 the pooled
length):

* ``net.<name>``: the whole SPP-net (trunk and the fc head the SVMs read; arch in the JSON);
* ``svm.W`` float32 ``[D, K]``, ``svm.b`` float32 ``[K]`` (-inf: a class without an SVM);
* ``bbox.coef`` float32 ``[K, 4, P]``, ``bbox.intercept`` float64 ``[K, 4]``, ``bbox.trained``
  uint8 ``[K]``, ``bbox.n_samples`` int64 ``[K]`` when there are regressors;
* the JSON: format, arch, layer (pool5 / fc6 / fc7), pool levels, the trunk's cell geometry,
  classes, the SVMs' and regressors' feature scales, and the settings a detection uses
  (``proposals``, ``features``, ``pool``, ``detect`` sections of the config).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sppcli.artifacts import atomic_path
from sppcli.detector.bbox_reg import BBoxRegressor

FORMAT = "sppcli.detector/1"


class BundleError(ValueError):
    """The file is not a detector bundle this version can read; the message says why."""


@dataclasses.dataclass(frozen=True, eq=False)
class DetectorBundle:
    arch: dict
    net_state: dict[str, torch.Tensor]
    layer: str
    pool_levels: list[int]
    geometry: dict  # stride, offset0, offset (sppcli.ops.geometry.FieldGeometry)
    classes: list[str]
    svm_W: np.ndarray
    svm_b: np.ndarray
    svm_scale: float
    regressor: BBoxRegressor | None
    settings: dict

    def save(self, path: Path) -> Path:
        """Write the bundle to ``path`` atomically."""
        from safetensors.torch import save_file

        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net_state.items()}
        tensors["svm.W"] = torch.from_numpy(np.ascontiguousarray(self.svm_W, np.float32))
        tensors["svm.b"] = torch.from_numpy(np.ascontiguousarray(self.svm_b, np.float32))
        meta: dict[str, Any] = {"format": FORMAT, "arch": self.arch, "layer": self.layer,
                                "pool_levels": list(self.pool_levels), "geometry": self.geometry,
                                "classes": list(self.classes), "svm_scale": self.svm_scale,
                                "settings": self.settings}
        if self.regressor is not None:
            r = self.regressor
            tensors["bbox.coef"] = torch.from_numpy(np.ascontiguousarray(r.coef, np.float32))
            tensors["bbox.intercept"] = torch.from_numpy(np.ascontiguousarray(r.intercept, np.float64))
            tensors["bbox.trained"] = torch.from_numpy(r.trained.astype(np.uint8))
            tensors["bbox.n_samples"] = torch.from_numpy(r.n_samples.astype(np.int64))
            meta["bbox"] = {"feature_scale": r.feature_scale, "lam": r.lam, "min_iou": r.min_iou}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"sppcli": json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: Path) -> "DetectorBundle":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: no such detector bundle (write one with `sppcli export --out {path.name}`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("sppcli", "null"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{path}: not a detector bundle ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BundleError(f"{path}: not an sppcli detector bundle of format {FORMAT}")
        regressor = None
        if "bbox.coef" in tensors:
            b = meta["bbox"]
            regressor = BBoxRegressor(coef=tensors["bbox.coef"].numpy(), intercept=tensors["bbox.intercept"].numpy(),
                                      trained=tensors["bbox.trained"].numpy().astype(bool),
                                      n_samples=tensors["bbox.n_samples"].numpy(), feature_scale=b["feature_scale"],
                                      lam=b["lam"], min_iou=b["min_iou"])
        return cls(arch=meta["arch"], net_state={k[4:]: v for k, v in tensors.items() if k.startswith("net.")},
                   layer=meta["layer"], pool_levels=meta["pool_levels"], geometry=meta["geometry"],
                   classes=meta["classes"], svm_W=tensors["svm.W"].numpy(), svm_b=tensors["svm.b"].numpy(),
                   svm_scale=float(meta["svm_scale"]), regressor=regressor, settings=meta["settings"])

    def net(self, device: str = "cpu"):
        """The SPP-net (eval mode) on ``device``."""
        from sppcli.nets.checkpoint import build_net

        net = build_net(self.arch)
        net.load_state_dict(self.net_state)
        return net.to(device).eval()
