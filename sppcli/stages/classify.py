"""`sppcli classify`: image classification with SPP features (paper sections 3.2-3.3, Tables 3-4).

Each image is resized so that ``min(w, h) = classify.size`` (any aspect ratio; with
``classify.view = "crop"`` only its centre ``size x size`` square is kept, the paper's Table 3
(a)/(b) baseline), the net runs to conv5, its own SPP layer pools the *whole* map into one
fixed-length vector, and that vector (``pool5``), its finest 6 x 6 level alone (``pool5_6x6``, the
paper's "pool5 (6x6)" rows), or fc6 / fc7 computed from it in eval mode is l2-normalised. One
linear SVM per class (sklearn's ``LinearSVC``, ``C = classify.C``; the paper fixes C = 1 and uses
no augmentation) is trained and scored.

Two protocols:

* VOC (default): trained on the train split, scored on the test split; per-class AP and mAP.
* Folder (``classify.folder = DIR`` of ``<class>/<image>`` files, e.g. a Caltech101 folder):
  Caltech101's protocol (:mod:`sppcli.data.caltech_protocol`): ``splits`` random splits of
  ``train_per_class`` training and up to ``test_per_class`` test images per class, mean class
  accuracy per split, and its mean and standard deviation over the splits. Every image's
  feature is computed once. The net is the features net (``features.weights`` or the pretrain
  checkpoint); no VOC split is read.

Image-level labels follow the VOC classification devkit: for class k an image is positive (1) if
it holds a non-difficult object of k, "difficult" (0) if it holds only difficult ones, negative
(-1) otherwise. Label-0 images are left out of that class's SVM training and are neither true nor
false positives in its AP (``VOCevalcls.m``), which is the 11-point ("voc2007") AP of the test
images ranked by score. mAP averages the classes with at least one positive test image.

The net is the one behind the upstream features artifact (role "features_net"): the pretrain
checkpoint or the weights file that ``features.weights`` names.

Outputs (VOC): ``svms.npz`` (``weights`` float32 [K, D], ``bias`` float32 [K], ``trained`` bool [K],
``classes``, ``layer``), ``ap.json`` (per-class AP, positives, mAP), ``scores.npz`` (test ids,
scores float32 [N, K], labels int8 [N, K]). Metrics: ``mAP``, ``ap`` (class -> AP), ``layer``,
``size``, ``view``, ``feature_dim``, ``seconds_per_image``.

Outputs (folder): ``accuracy.json`` (per split: mean class accuracy and per-class accuracy).
Metrics: ``accuracy_mean``, ``accuracy_std``, ``accuracy`` (per split), ``classes``,
``images_per_class``, ``layer``, ``size``, ``view``, ``feature_dim``, ``seconds_per_image``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sppcli.artifacts import Manifest, StageRun, atomic_path, atomic_write_json, json_number
from sppcli.config import ClassifyParams, Config, NetParams
from sppcli.data import caltech_protocol, crops
from sppcli.data.voc import load_rgb
from sppcli.data.voc_eval import average_precision
from sppcli.nets.net_source import load_net_for_features, load_source, resolve_net_source
from sppcli.nets.sppnet import SppNet, normalize
from sppcli.ops.geometry import scaled_size
from sppcli.parallel import progress, resolve_device, worker_errors_unwrapped

log = logging.getLogger(__name__)

Params = ClassifyParams

# No cap on the longer side: classification resizes by the shorter side only (paper section 3.2).
_NO_MAX_SIDE = 1 << 30
LAYERS = ("pool5", "pool5_6x6", "fc6", "fc7")
VIEWS = ("full", "crop")


def params_from(config: Config) -> Params:
    return config.classify


@dataclasses.dataclass(frozen=True)
class Inputs:
    """VOC protocol: ``train``, ``test`` and ``features`` (the upstream features artifact, whose
    ``metrics["net"]`` names the net). Folder protocol: ``net_source`` and ``net_params``."""

    train: Any  # VocDataset of the train split
    test: Any  # VocDataset of the test split
    features: Manifest | None
    device: str
    workers: int
    net_source: Any = None
    net_params: NetParams | None = None


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    c = planner.config
    device = resolve_device(options.device)
    if c.classify.folder:
        return Inputs(train=None, test=None, features=None, device=device, workers=options.workers,
                      net_source=resolve_net_source(c.features.weights, upstream.get("pretrain")),
                      net_params=c.net)
    return Inputs(train=planner.dataset(c.dataset.train_split), test=planner.dataset(c.dataset.test_split),
                  features=upstream["features_net"], device=device, workers=options.workers)


# ---------------------------------------------------------------------------------------------
# labels and AP


def image_labels(dataset: Any) -> np.ndarray:
    """int8 ``[N, K]`` VOC classification labels of every image of ``dataset`` (ids order):
    1 = a non-difficult object of the class, 0 = only difficult ones, -1 = none."""
    labels = np.full((len(dataset.ids), len(dataset.classes)), -1, dtype=np.int8)
    for row, image_id in enumerate(dataset.ids):
        gt = dataset.ground_truth(image_id)
        for label, difficult in zip(gt.labels, gt.difficult):
            if not difficult:
                labels[row, label] = 1
            elif labels[row, label] < 0:
                labels[row, label] = 0
    return labels


def classification_ap(scores: np.ndarray, labels: np.ndarray, metric: str = "voc2007") -> float:
    """AP of one class over ranked images, as ``VOCevalcls.m`` computes it.

    Args:
        scores: float ``[N]`` image scores.
        labels: int ``[N]`` in {1, 0, -1}; 0 (difficult only) is neither a true nor a false
            positive but keeps its rank.
    Returns:
        AP, or NaN if no image is positive.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    n_pos = int(np.sum(labels > 0))
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")  # MATLAB's sort is stable
    tp = np.cumsum(labels[order] > 0).astype(np.float64)
    fp = np.cumsum(labels[order] < 0).astype(np.float64)
    recall = tp / n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)  # NaN before the first counted image, as in the devkit
    return average_precision(recall, precision, metric)


# ---------------------------------------------------------------------------------------------
# features


class ResizedImages(Dataset):
    """Images resized so ``min(w, h) = size``: uint8 ``[3, h, w]`` tensors (``view="crop"``: the
    centre ``[3, size, size]`` of that).

    ``source`` is a VOC split (its ``ids`` and ``load_image``) or a list of image file paths.
    """

    def __init__(self, source: Any, size: int, view: str = "full"):
        if view not in VIEWS:
            raise ValueError(f"classify.view = {view!r}; known views: {', '.join(VIEWS)}")
        self.source, self.size, self.view = source, int(size), view

    def __len__(self) -> int:
        return len(self.source) if isinstance(self.source, (list, tuple)) else len(self.source.ids)

    def _load(self, index: int) -> np.ndarray:
        if isinstance(self.source, (list, tuple)):
            return load_rgb(self.source[index])
        return self.source.load_image(self.source.ids[index])

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._load(index)
        height, width = image.shape[:2]
        new_w, new_h, _ = scaled_size(width, height, self.size, _NO_MAX_SIDE)
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if (new_h, new_w) != (height, width):
            resized = torch.nn.functional.interpolate(chw[None].float(), size=(new_h, new_w), mode="bilinear",
                                                      antialias=True, align_corners=False)
            chw = resized[0].round().clamp(0, 255).to(torch.uint8)
        if self.view == "crop":
            top, left = (chw.shape[1] - self.size) // 2, (chw.shape[2] - self.size) // 2
            chw = chw[:, top:top + self.size, left:left + self.size]
        return chw.contiguous()


def finest_level_slice(net: SppNet) -> slice:
    """Where the pyramid's 6 x 6 level lies in the net's pooled vector (levels concatenated in
    ``net.levels`` order, each channel-major)."""
    levels = [int(n) for n in net.levels]
    if 6 not in levels:
        raise ValueError(f"classify.layer = 'pool5_6x6' needs a 6 x 6 pyramid level; this net's levels are {levels}")
    channels = int(net.trunk.out_channels)
    start = channels * sum(n * n for n in levels[:levels.index(6)])
    return slice(start, start + channels * 36)


@torch.no_grad()
def image_features(net: SppNet, image: torch.Tensor, layer: str) -> torch.Tensor:
    """One full-image feature vector: uint8 ``[3, H, W]`` (on the net's device) -> float32
    ``[D]`` at ``layer`` ("pool5" = the whole SPP vector, "pool5_6x6" = its 6 x 6 level, "fc6" /
    "fc7" after ReLU), not yet normalised."""
    pooled = net.pooled(normalize(image[None]))
    if layer == "pool5":
        out = pooled
    elif layer == "pool5_6x6":
        out = pooled[:, finest_level_slice(net)]
    elif layer == "fc6":
        out = net.head.fc6_features(pooled)
    elif layer == "fc7":
        out = net.head.fc7_features(pooled)
    else:
        raise ValueError(f"unknown classify.layer {layer!r}; known layers: {', '.join(LAYERS)}")
    return out[0].float()


def split_features(net: SppNet, source: Any, size: int, layer: str, device: str, workers: int,
                   desc: str, view: str = "full") -> np.ndarray:
    """float32 ``[N, D]`` l2-normalised features of every image of ``source`` (a VOC split or a
    list of image paths, see :class:`ResizedImages`)."""
    net.eval()
    images = ResizedImages(source, size, view)
    loader = DataLoader(images, batch_size=None, shuffle=False, num_workers=0 if workers <= 1 else int(workers))
    rows = []
    for image in progress(worker_errors_unwrapped(loader), total=len(images), desc=desc):
        rows.append(image_features(net, image.to(device), layer).cpu().numpy())
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------------------------------------
# SVMs


def train_svms(features: np.ndarray, labels: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest linear SVMs.

    Args:
        features: float32 ``[N, D]``.
        labels: int8 ``[N, K]`` in {1, 0, -1}; rows with 0 are left out of that class.
        C: soft-margin parameter.
    Returns:
        (weights float32 ``[K, D]``, bias float32 ``[K]``, trained bool ``[K]``); a class
        without both positives and negatives gets zero weights and ``trained = False``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    n_classes = labels.shape[1]
    weights = np.zeros((n_classes, features.shape[1]), dtype=np.float32)
    bias = np.zeros(n_classes, dtype=np.float32)
    trained = np.zeros(n_classes, dtype=bool)
    for k in range(n_classes):
        keep = labels[:, k] != 0
        y = labels[keep, k] > 0
        if y.all() or not y.any():
            continue
        svm = LinearSVC(C=C, loss="squared_hinge", dual=True, max_iter=20000, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            svm.fit(features[keep], y.astype(np.int64))
        weights[k] = svm.coef_[0]
        bias[k] = svm.intercept_[0]
        trained[k] = True
    return weights, bias, trained


def check_params(params: Params) -> None:
    if params.layer not in LAYERS:
        raise ValueError(f"classify.layer = {params.layer!r}; known layers: {', '.join(LAYERS)}")
    if params.view not in VIEWS:
        raise ValueError(f"classify.view = {params.view!r}; known views: {', '.join(VIEWS)}")
    if params.size < 1 or not params.C > 0:
        raise ValueError(f"classify needs size >= 1 and C > 0, got size={params.size}, C={params.C}")


def run(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    if params.folder:
        return run_folder(params, inputs, out)
    classes = list(inputs.train.classes)
    if list(inputs.test.classes) != classes:
        raise ValueError(f"train and test classes differ: {classes} vs {list(inputs.test.classes)}")
    net, arch = load_net_for_features(inputs.features, map_location=inputs.device)

    t0 = time.perf_counter()
    train_x = split_features(net, inputs.train, params.size, params.layer, inputs.device, inputs.workers,
                             f"classify {inputs.train.split}", params.view)
    test_x = split_features(net, inputs.test, params.size, params.layer, inputs.device, inputs.workers,
                            f"classify {inputs.test.split}", params.view)
    feature_seconds = time.perf_counter() - t0
    train_y, test_y = image_labels(inputs.train), image_labels(inputs.test)

    t0 = time.perf_counter()
    weights, bias, trained = train_svms(train_x, train_y, params.C)
    svm_seconds = time.perf_counter() - t0
    scores = test_x @ weights.T + bias

    ap = {name: classification_ap(scores[:, k], test_y[:, k]) for k, name in enumerate(classes)}
    valid = [v for v in ap.values() if not math.isnan(v)]
    mean_ap = float(np.mean(valid)) if valid else float("nan")
    n_pos = {name: int(np.sum(test_y[:, k] > 0)) for k, name in enumerate(classes)}

    with atomic_path(out.dir / "svms.npz") as tmp:
        np.savez(tmp, weights=weights, bias=bias, trained=trained, classes=np.array(classes),
                 layer=np.array(params.layer), size=np.array(params.size))
    with atomic_path(out.dir / "scores.npz") as tmp:
        np.savez(tmp, ids=np.array(inputs.test.ids), scores=scores.astype(np.float32), labels=test_y)
    # JSON has no NaN: a class without positive test images gets null.
    ap_json = {name: json_number(v) for name, v in ap.items()}
    atomic_write_json(out.dir / "ap.json", {"ap": ap_json, "mAP": json_number(mean_ap),
                                            "positives": n_pos, "layer": params.layer, "size": params.size,
                                            "metric": "voc2007"})
    n_images = len(inputs.train.ids) + len(inputs.test.ids)
    metrics = {
        "mAP": json_number(mean_ap),
        "ap": ap_json,
        "positives": n_pos,
        "svm_trained": {name: bool(t) for name, t in zip(classes, trained)},
        "layer": params.layer,
        "size": params.size,
        "view": params.view,
        "feature_dim": int(train_x.shape[1]),
        "net": {"path": inputs.features.metrics.get("net", {}).get("path"), "arch": arch},
        "seconds_per_image": feature_seconds / max(n_images, 1),
    }
    return out.finish(metrics=metrics, timings={"feature_seconds": round(feature_seconds, 3),
                                                "svm_seconds": round(svm_seconds, 3)},
                      n_items=n_images, device=inputs.device)


def run_folder(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    """Caltech101's protocol on ``params.folder`` (see the module docstring)."""
    samples, classes = crops.folder_samples(Path(params.folder))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    splits = caltech_protocol.random_splits(labels, params.train_per_class, params.test_per_class,
                                            params.splits, params.seed)
    net, arch = load_source(inputs.net_source, inputs.net_params, map_location=inputs.device)

    t0 = time.perf_counter()
    features = split_features(net, [s.path for s in samples], params.size, params.layer, inputs.device,
                              inputs.workers, f"classify {Path(params.folder).name}", params.view)
    feature_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_split = []
    for split in progress(splits, desc="classify splits"):
        # one-vs-rest targets: +1 for the class, -1 for every other (no "difficult" rows here)
        targets = np.where(labels[split.train, None] == np.arange(len(classes))[None], 1, -1).astype(np.int8)
        weights, bias, _ = train_svms(features[split.train], targets, params.C)
        predicted = np.argmax(features[split.test] @ weights.T + bias, axis=1)
        truth = labels[split.test]
        per_split.append({
            "mean_class_accuracy": caltech_protocol.mean_class_accuracy(predicted, truth),
            "per_class": {classes[k]: float(np.mean(predicted[truth == k] == k)) for k in np.unique(truth)},
            "test_images": int(len(split.test))})
    svm_seconds = time.perf_counter() - t0

    accuracies = np.array([s["mean_class_accuracy"] for s in per_split])
    atomic_write_json(out.dir / "accuracy.json", {"splits": per_split, "classes": list(classes)})
    metrics = {
        "protocol": "folder",
        "accuracy_mean": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std(ddof=0)),
        "accuracy": [float(a) for a in accuracies],
        "classes": list(classes),
        "images_per_class": {name: int(np.sum(labels == k)) for k, name in enumerate(classes)},
        "layer": params.layer,
        "size": params.size,
        "view": params.view,
        "feature_dim": int(features.shape[1]),
        "net": {"path": str(inputs.net_source.path), "arch": arch},
        "seconds_per_image": feature_seconds / max(len(samples), 1),
    }
    log.info("classify %s: mean class accuracy %.2f +- %.2f %% over %d splits", Path(params.folder).name,
             100 * metrics["accuracy_mean"], 100 * metrics["accuracy_std"], len(splits))
    return out.finish(metrics=metrics, timings={"feature_seconds": round(feature_seconds, 3),
                                                "svm_seconds": round(svm_seconds, 3)},
                      n_items=len(samples), device=inputs.device)
