"""Class-specific bounding-box regression (R-CNN appendix C, as the SPP-net release trains it).

Per class, a ridge regression maps a window's scaled features (pooled conv5 in the paper) to
R-CNN's targets ``(dx, dy, dw, dh)`` (``sppcli.ops.boxes.bbox_deltas``) that move the window
onto its ground-truth box. Following ``spp_train_bbox_regressor.m``:

- training windows of class k are those assigned to a ground truth of class k with
  IoU > min_iou (0.5), strictly, as its per-class selection ``O > opts.min_overlap`` does
  (the paper says "at least 50%"); ground-truth boxes themselves (IoU 1) qualify;
- features are scaled so that their mean L2 norm over the training windows is 20 (R-CNN's
  ``rcnn_scale_features``), a factor the caller estimates and passes in;
- a constant-1 bias feature is appended and regularised with the rest: the solution
  minimises ``||[X 1] beta - (Y - mu)||^2 + lambda ||beta||^2`` with lambda = 4000 and mu the
  per-class mean of the targets. Centring matters because the bias is penalised. The release
  also whitens the centred targets and un-whitens predictions; ridge regression is linear in
  its targets (each output column is solved independently with the same matrix), so that
  transform cancels exactly and is not repeated here.

Memory: a class's float64 design matrix is ``n x (D + 1)`` doubles, 10 GB for VOC's ~100k
``person`` windows at 12,800-d. Up to ``max_design_bytes`` it is built whole and solved by
scikit-learn's ``Ridge``; a larger class is solved from the same normal equations accumulated
chunk by chunk (``X^T X``, ``(D + 1)^2`` doubles: 1.3 GB at 12,800-d), which gives the same
solution up to floating-point rounding.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge

from sppcli.artifacts import atomic_path
from sppcli.ops.boxes import apply_deltas, bbox_deltas, paired_iou

BBOX_REG_FORMAT = "sppcli.bbox_regressor/1"


@dataclasses.dataclass(frozen=True, eq=False)
class BBoxRegressor:
    """One linear regressor per class on scaled features.

    coef (float32[K, 4, D]) and intercept (float64[K, 4], target mean included): predicted
        deltas of a class-k window with raw features f are ``(f * feature_scale) @ coef[k].T +
        intercept[k]``.
    trained (bool[K]): False for classes without training windows; they predict zero deltas.
    n_samples (int64[K]): training windows per class.
    """

    coef: np.ndarray
    intercept: np.ndarray
    trained: np.ndarray
    n_samples: np.ndarray
    feature_scale: float
    lam: float
    min_iou: float

    @property
    def n_classes(self) -> int:
        return int(self.coef.shape[0])

    def predict_deltas(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Deltas (float64[N, 4]) for raw features float[N, D] of windows of class labels int[N]."""
        features = np.asarray(features)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if features.ndim != 2 or features.shape[1] != self.coef.shape[2] or len(features) != len(labels):
            raise ValueError(
                f"features must be [N, {self.coef.shape[2]}] with N = len(labels) = {len(labels)}, got {features.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"labels must be in [0, {self.n_classes}), got {labels.min()}..{labels.max()}")
        deltas = np.zeros((len(labels), 4), dtype=np.float64)
        for k in np.unique(labels):
            if not self.trained[k]:
                continue
            rows = labels == k
            scaled = features[rows].astype(np.float64) * self.feature_scale
            deltas[rows] = scaled @ self.coef[k].astype(np.float64).T + self.intercept[k]
        return deltas

    def predict(self, features: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Refined boxes (float64[N, 4], internal convention, not clipped to the image).

        features: raw float[N, D]; boxes: float[N, 4] windows; labels: int[N] class of each
        window (the class whose detector scored it). Windows of untrained classes come back
        unchanged.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        deltas = self.predict_deltas(features, labels)
        return apply_deltas(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()


def fit_ridge_regressors(
    features: np.ndarray,
    proposal_boxes: np.ndarray,
    gt_boxes: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    lam: float = 4000.0,
    feature_scale: float = 1.0,
    min_iou: float = 0.5,
    max_design_bytes: int = 2 << 30,
) -> BBoxRegressor:
    """Fit one ridge regressor per class.

    features (float[N, D]): raw features of the windows (scaled here by ``feature_scale``).
    proposal_boxes (float[N, 4]): the windows; gt_boxes (float[N, 4]): the ground truth each
        window is assigned to (its best-overlapping object); both internal convention.
    labels (int[N]): class in [0, n_classes) of that ground truth; negative = no object
        (ignored).
    A window trains its class's regressor when IoU(window, its gt) > min_iou.
    max_design_bytes: above this size of a class's float64 design matrix, solve the normal
        equations chunk by chunk instead (see the module docstring).
    """
    features = np.asarray(features)
    proposal_boxes = np.asarray(proposal_boxes, dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(labels)
    if features.ndim != 2 or len(features) != n or len(proposal_boxes) != n or len(gt_boxes) != n:
        raise ValueError(
            f"features {features.shape}, proposal_boxes {proposal_boxes.shape}, gt_boxes {gt_boxes.shape} "
            f"and labels ({n},) must agree in length"
        )
    if n and labels.max() >= n_classes:
        raise ValueError(f"labels must be < n_classes = {n_classes}, got {labels.max()}")
    dim = features.shape[1]
    used = (labels >= 0) & (paired_iou(proposal_boxes, gt_boxes) > min_iou)
    coef = np.zeros((n_classes, 4, dim), dtype=np.float32)
    intercept = np.zeros((n_classes, 4), dtype=np.float64)
    trained = np.zeros(n_classes, dtype=bool)
    n_samples = np.zeros(n_classes, dtype=np.int64)
    for k in range(n_classes):
        rows = np.flatnonzero(used & (labels == k))
        n_samples[k] = len(rows)
        if len(rows):
            coef[k], intercept[k] = fit_class(features[rows], proposal_boxes[rows], gt_boxes[rows], lam, feature_scale,
                                              max_design_bytes)
            trained[k] = True
    return BBoxRegressor(
        coef=coef,
        intercept=intercept,
        trained=trained,
        n_samples=n_samples,
        feature_scale=float(feature_scale),
        lam=float(lam),
        min_iou=float(min_iou),
    )


def fit_class(features: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray, lam: float, feature_scale: float,
              max_design_bytes: int = 2 << 30) -> tuple[np.ndarray, np.ndarray]:
    """One class's regressor from its training windows (already selected: IoU > min_iou):
    ``(coef float32 [4, D], intercept float64 [4])`` (target mean included)."""
    dim = features.shape[1]
    targets = bbox_deltas(torch.from_numpy(np.asarray(boxes, np.float64)),
                          torch.from_numpy(np.asarray(gt_boxes, np.float64))).numpy()
    target_mean = targets.mean(axis=0)
    if len(features) * (dim + 1) * 8 <= max_design_bytes:
        beta = _ridge_whole(features, feature_scale, targets - target_mean, lam)
    else:
        beta = _ridge_chunked(features, np.arange(len(features)), feature_scale, targets - target_mean, lam)
    return beta[:, :dim].astype(np.float32), beta[:, dim] + target_mean


def _design(features: np.ndarray, scale: float) -> np.ndarray:
    return np.concatenate([features.astype(np.float64) * scale, np.ones((len(features), 1))], axis=1)


def _ridge_whole(features: np.ndarray, scale: float, centred_targets: np.ndarray, lam: float) -> np.ndarray:
    """``[4, D + 1]`` ridge solution (bias last) from the whole design matrix."""
    # fit_intercept=False with an explicit ones column: the bias is penalised like the
    # release's, instead of sklearn's unpenalised intercept.
    return Ridge(alpha=lam, fit_intercept=False).fit(_design(features, scale), centred_targets).coef_


def _ridge_chunked(features: np.ndarray, rows: np.ndarray, scale: float, centred_targets: np.ndarray, lam: float,
                   chunk: int = 8192) -> np.ndarray:
    """The same solution from ``(X^T X + lam I) beta = X^T y`` accumulated over row chunks."""
    import scipy.linalg

    dim = features.shape[1] + 1
    gram = np.zeros((dim, dim))
    moment = np.zeros((dim, centred_targets.shape[1]))
    for start in range(0, len(rows), chunk):
        part = _design(features[rows[start:start + chunk]], scale)
        gram += part.T @ part
        moment += part.T @ centred_targets[start:start + chunk]
    gram.flat[:: dim + 1] += lam
    return scipy.linalg.solve(gram, moment, assume_a="pos", overwrite_a=True).T


def save_regressor(path: str | Path, regressor: BBoxRegressor, class_names: list[str] | None = None) -> Path:
    """Write a regressor as NPZ (no pickles), atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            format=np.array(BBOX_REG_FORMAT),
            coef=regressor.coef,
            intercept=regressor.intercept,
            trained=regressor.trained,
            n_samples=regressor.n_samples,
            feature_scale=np.array(regressor.feature_scale),
            lam=np.array(regressor.lam),
            min_iou=np.array(regressor.min_iou),
            class_names=np.array(json.dumps(class_names)),
        )
    return path


def load_regressor(path: str | Path) -> tuple[BBoxRegressor, list[str] | None]:
    """Read :func:`save_regressor` output: (regressor, class names or None)."""
    with np.load(path, allow_pickle=False) as data:
        if str(data["format"]) != BBOX_REG_FORMAT:
            raise ValueError(f"{path}: not an sppcli bounding-box regressor (format {data['format']!s})")
        regressor = BBoxRegressor(
            coef=data["coef"].copy(),
            intercept=data["intercept"].copy(),
            trained=data["trained"].copy(),
            n_samples=data["n_samples"].copy(),
            feature_scale=float(data["feature_scale"]),
            lam=float(data["lam"]),
            min_iou=float(data["min_iou"]),
        )
        return regressor, json.loads(str(data["class_names"]))
