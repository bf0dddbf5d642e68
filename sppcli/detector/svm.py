"""Per-class linear SVMs with hard-negative mining, as in the R-CNN and SPP-net releases.

The releases (``rcnn_train.m``, ``spp_train.m``) train one binary SVM per class with liblinear
``-s 3 -c C -w1 2 -B 10``: L2-regularised hinge loss solved in the dual, positives' loss
weighted 2, and a constant bias feature of value 10 whose weight is regularised like the
others. scikit-learn's ``LinearSVC(loss="hinge", dual=True, class_weight={1: 2, -1: 1},
intercept_scaling=10)`` is the same liblinear problem; its ``intercept_`` is
``10 * w_bias``, so the detector's score is ``features @ w + b`` with that ``b``.

The objective the releases log after each retrain, reproduced by :func:`svm_objective`::

    C * pos_loss_weight * sum(max(0, 1 - z_pos))     (pos)
  + C * sum(max(0, 1 + z_neg))                       (neg)
  + 0.5 * ||w||^2 + 0.5 * (b / bias_value)^2         (reg)

Hard-negative mining (one pass over the images, per class):

- The negatives of the first image are all put in the cache, unscored; negatives of a later
  image enter the cache when their score under the current model is > ``hard_threshold``
  (-1.0001). Before the first training the model is all zeros and scores every window 0, so
  every negative is hard until then.
- The model is retrained after the first image, whenever more than ``retrain_limit`` (2,000)
  negatives were added since the last training, and after the last image; never while the
  cache is empty.
- After each retrain, cached negatives scoring < ``evict_threshold`` (-1.2) are evicted.
- With ``max_cache`` > 0, a cache still larger than that after the eviction keeps only its
  ``max_cache`` highest-scoring negatives: a hard memory bound (20 classes x max_cache x D x
  the dtype's bytes) that the releases did not have; it changes nothing while caches stay under
  it (they do on the embedded data; R-CNN's VOC caches held ~10-30k per class).
- The cache holds ``cache_dtype`` copies: float16 halves the memory of 20 classes' caches of
  4,096-d fc7 features (the hard/easy decisions are still made on the float32 features; the
  cached copies, rounded to float16, are what the retrains see).

Selecting negatives (IoU < 0.3 with every positive of the class) and removing near-duplicates
is the caller's job, per image; :func:`dedup_negatives` implements the paper's rule and
:func:`unique_windows` the authors' release's rule (see their docstrings).

Features are scaled by ``target_norm / mean_norm`` (:func:`feature_scale`) before training
and scoring, so that their mean L2 norm over the training set is 20 (``rcnn_scale_features.m``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from sklearn.svm import LinearSVC

from sppcli.artifacts import atomic_path
from sppcli.config import SvmParams
from sppcli.ops.boxes import box_iou

SVM_FORMAT = "sppcli.svms/1"


class NoPositivesError(ValueError):
    """A class has no positive examples, so no SVM can be trained for it; callers skip it."""


class NoNegativesError(ValueError):
    """The negative stream of a class held no negatives at all, so no SVM can be trained."""


#: liblinear's stopping tolerance for ``-s 3`` (its default, which the releases used) and its
#: iteration cap. Smaller tolerances solve each retrain more exactly, at more cost.
LIBLINEAR_TOL = 0.1
LIBLINEAR_MAX_ITER = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class SvmModel:
    """One class's linear SVM: ``score = features @ w + b`` on scaled features.

    w (float32[D]), b (float), history: one dict per retrain with keys batch_index (the
    negative batch after which it ran), n_positives, n_cache (negatives trained on), n_hard
    (negatives added since the previous retrain), n_evicted, n_pos_sv, n_neg_sv (margin
    support vectors, as the releases count them), pos_loss, neg_loss, reg, objective.
    """

    w: np.ndarray
    b: float
    history: tuple[dict, ...] = ()


def feature_scale(mean_norm: float, target_norm: float = 20.0) -> float:
    """Factor that brings features of mean L2 norm ``mean_norm`` to mean norm ``target_norm``."""
    if not mean_norm > 0:
        raise ValueError(f"mean feature norm must be positive, got {mean_norm}")
    return float(target_norm) / float(mean_norm)


def score(features: np.ndarray, model: SvmModel) -> np.ndarray:
    """SVM scores (float32[N]) of scaled features (float[N, D])."""
    features = np.asarray(features, dtype=np.float32)
    return features @ model.w + np.float32(model.b)


def svm_objective(
    w: np.ndarray, b: float, positives: np.ndarray, negatives: np.ndarray, params: SvmParams = SvmParams()
) -> dict[str, float]:
    """The releases' primal objective of (w, b) on the given examples (float64 arithmetic).

    Returns dict(pos_loss, neg_loss, reg, objective); see the module docstring for the formula.
    """
    w64 = np.asarray(w, dtype=np.float64)
    z_pos = np.asarray(positives, dtype=np.float64).reshape(-1, w64.size) @ w64 + b
    z_neg = np.asarray(negatives, dtype=np.float64).reshape(-1, w64.size) @ w64 + b
    pos_loss = params.C * params.pos_loss_weight * float(np.maximum(0.0, 1.0 - z_pos).sum())
    neg_loss = params.C * float(np.maximum(0.0, 1.0 + z_neg).sum())
    reg = 0.5 * float(w64 @ w64) + 0.5 * (float(b) / params.bias_value) ** 2
    return {"pos_loss": pos_loss, "neg_loss": neg_loss, "reg": reg, "objective": pos_loss + neg_loss + reg}


def fit_linear_svm(
    positives: np.ndarray, negatives: np.ndarray, params: SvmParams = SvmParams(),
    tol: float = LIBLINEAR_TOL, max_iter: int = LIBLINEAR_MAX_ITER,
) -> tuple[np.ndarray, float]:
    """One liblinear solve of the releases' problem; returns (w float32[D], b float).

    ``params`` gives C, pos_loss_weight and bias_value (liblinear ``-c``, ``-w1``, ``-B``).
    """
    features = np.concatenate([positives, negatives]).astype(np.float64, copy=False)
    targets = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    solver = LinearSVC(
        C=params.C,
        loss="hinge",
        dual=True,
        class_weight={1: params.pos_loss_weight, -1: 1.0},
        fit_intercept=True,
        intercept_scaling=params.bias_value,
        tol=tol,
        max_iter=max_iter,
        random_state=0,  # liblinear's coordinate order is random; fixed for reproducible models
    )
    solver.fit(features, targets)
    return solver.coef_[0].astype(np.float32), float(solver.intercept_[0])


def _with_last_flag(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    # One item of look-ahead: the releases retrain after the last image, which we only know
    # about once the stream says there is nothing after it.
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


def _as_features(array: Any, dim: int | None, what: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1 and array.size == 0 and dim is not None:
        array = array.reshape(0, dim)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise ValueError(f"{what} must have shape [n, {dim if dim is not None else 'D'}], got {array.shape}")
    return array


def train_class_svm(
    positives: np.ndarray,
    negative_batches: Iterable[np.ndarray],
    params: SvmParams = SvmParams(),
    log: Callable[[str], None] | None = None,
    tol: float = LIBLINEAR_TOL,
    max_iter: int = LIBLINEAR_MAX_ITER,
) -> SvmModel:
    """Train one class's SVM with the releases' one-pass hard-negative mining.

    positives (float[P, D]): scaled features of the class's ground-truth boxes.
    negative_batches: iterable of float[n_i, D], one per training image in a fixed order (an
        image without negatives yields an empty [0, D] array, which still counts as an image),
        already restricted to valid negatives and deduplicated, and scaled. Consumed once, one
        batch ahead.
    params: the svm config section (C, pos_loss_weight, bias_value, hard_threshold,
        evict_threshold, retrain_limit are used here).
    log: called with one human-readable line per retrain.
    tol, max_iter: liblinear's tolerance and iteration cap for every retrain.
    Raises NoPositivesError when P == 0 and NoNegativesError when no batch held a negative.
    """
    positives = _as_features(positives, None, "positives")
    if positives.shape[0] == 0:
        raise NoPositivesError("no positive examples for this class")
    dim = positives.shape[1]
    w = np.zeros(dim, dtype=np.float32)
    b = 0.0
    cache: list[np.ndarray] = []
    n_added = 0
    history: list[dict] = []
    for batch_index, (batch, is_last) in enumerate(_with_last_flag(negative_batches)):
        batch = _as_features(batch, dim, f"negative batch {batch_index}")
        if batch_index == 0:
            hard = batch
        else:
            hard = batch[batch @ w + np.float32(b) > params.hard_threshold]
        if len(hard):
            cache.append(hard.astype(params.cache_dtype, copy=False))
            n_added += len(hard)
        first_time = batch_index == 0
        if not (first_time or n_added > params.retrain_limit or is_last) or not cache:
            continue

        negatives = np.concatenate(cache) if len(cache) > 1 else cache[0]
        w, b = fit_linear_svm(positives, negatives, params, tol, max_iter)
        z_pos = positives @ w + np.float32(b)
        z_neg = negatives @ w + np.float32(b)
        losses = svm_objective(w, b, positives, negatives, params)
        easy = z_neg < params.evict_threshold
        entry = {
            "batch_index": batch_index,
            "n_positives": int(len(positives)),
            "n_cache": int(len(negatives)),
            "n_hard": int(n_added),
            "n_evicted": int(easy.sum()),
            "n_pos_sv": int((z_pos < 1 + np.finfo(np.float32).eps).sum()),
            "n_neg_sv": int((z_neg > -1 - np.finfo(np.float32).eps).sum()),
            **losses,
        }
        kept = negatives[~easy]
        if params.max_cache and len(kept) > params.max_cache:
            # a memory bound the releases did not have: keep the hardest (highest-scoring) ones
            hardest = np.sort(np.argsort(-z_neg[~easy], kind="stable")[: params.max_cache])
            entry["n_capped"] = int(len(kept) - params.max_cache)
            kept = kept[hardest]
        history.append(entry)
        cache = [kept] if len(kept) else []
        n_added = 0
        if log is not None:
            log(
                f"retrain {len(history)} after batch {batch_index}: {entry['n_positives']} pos, "
                f"{entry['n_cache']} neg ({entry['n_hard']} new hard); obj {entry['objective']:.3f} = "
                f"{entry['pos_loss']:.3f} (pos) + {entry['neg_loss']:.3f} (neg) + {entry['reg']:.3f} (reg); "
                f"evicted {entry['n_evicted']}; SVs {entry['n_pos_sv']} pos {entry['n_neg_sv']} neg"
            )
    if not history:
        raise NoNegativesError("the negative stream held no negatives for this class")
    return SvmModel(w=w, b=b, history=tuple(history))


def dedup_negatives(boxes: np.ndarray, iou_threshold: float = 0.7) -> np.ndarray:
    """Indices of negatives kept after removing near-duplicates (the paper's rule).

    boxes (float[N, 4]): one image's negative windows, internal convention, in proposal order.
    Greedy in the given order: a window is dropped when it overlaps an already kept window by
    IoU > iou_threshold. This is the rule the SPP-net paper states ("removed if it overlaps
    another negative sample by more than 70%", from Uijlings et al.'s selective-search SVMs);
    the paper names no order, so proposal order is used, which makes the result deterministic.
    Returns int64[K], ascending.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    overlapping = (box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)) > iou_threshold).numpy()
    dropped = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if dropped[i]:
            continue
        kept.append(i)
        dropped[i + 1 :] |= overlapping[i, i + 1 :]
    return np.asarray(kept, dtype=np.int64)


def unique_windows(cell_windows: np.ndarray, scale_indices: np.ndarray) -> np.ndarray:
    """Indices of the first window of each distinct (feature-map window, scale) pair.

    cell_windows (int[N, 4]): inclusive feature-map cells (x1, y1, x2, y2) of each window at
        its chosen scale; scale_indices (int[N]): that scale's index.
    Windows that pool the same cells at the same scale have identical features. The authors'
    SPP release drops such duplicates when it mines negatives (``spp_load_cached_poolX_features``
    with ``dedup``, via ``unique(..., 'rows')``) instead of applying the paper's 0.7-IoU rule.
    Returns int64[K], ascending (first occurrences).
    """
    cells = np.asarray(cell_windows, dtype=np.int64).reshape(-1, 4)
    scales = np.asarray(scale_indices, dtype=np.int64).reshape(-1, 1)
    keys = np.concatenate([cells, scales], axis=1)
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(keys, axis=0, return_index=True)
    return np.sort(first).astype(np.int64)


def save_svms(
    path: str | Path,
    models: Mapping[str, SvmModel | None],
    scale: float,
    class_names: Sequence[str],
    params: SvmParams | None = None,
) -> Path:
    """Write SVMs of several classes to one NPZ file, atomically; returns the path.

    Arrays: W float32[K, D] (zeros for a class without a model), b float64[K], trained bool[K],
    class_names str[K], feature_scale float64[], and JSON strings (format, params, history).
    No pickled objects: ``np.load(path, allow_pickle=False)`` reads it.
    """
    trained = [models.get(name) is not None for name in class_names]
    if not any(trained):
        raise ValueError("no trained SVM to save")
    dims = {models[name].w.shape[0] for name, ok in zip(class_names, trained) if ok}
    if len(dims) != 1:
        raise ValueError(f"SVMs disagree in feature dimension: {sorted(dims)}")
    dim = dims.pop()
    weights = np.zeros((len(class_names), dim), dtype=np.float32)
    biases = np.zeros(len(class_names), dtype=np.float64)
    history = {}
    for k, name in enumerate(class_names):
        model = models.get(name)
        if model is not None:
            weights[k] = model.w
            biases[k] = model.b
            history[name] = list(model.history)
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            format=np.array(SVM_FORMAT),
            W=weights,
            b=biases,
            trained=np.array(trained, dtype=bool),
            class_names=np.array(list(class_names), dtype=str),
            feature_scale=np.array(float(scale), dtype=np.float64),
            params=np.array(json.dumps(dataclasses.asdict(params) if params is not None else None)),
            history=np.array(json.dumps(history)),
        )
    return path


def load_svms(path: str | Path) -> tuple[dict[str, SvmModel | None], float, list[str]]:
    """Read :func:`save_svms` output: (class name -> SvmModel or None, feature scale, class names)."""
    with np.load(path, allow_pickle=False) as data:
        if str(data["format"]) != SVM_FORMAT:
            raise ValueError(f"{path}: not an sppcli SVM file (format {data['format']!s})")
        class_names = [str(name) for name in data["class_names"]]
        history = json.loads(str(data["history"]))
        models: dict[str, SvmModel | None] = {}
        for k, name in enumerate(class_names):
            if data["trained"][k]:
                models[name] = SvmModel(
                    w=data["W"][k].copy(), b=float(data["b"][k]), history=tuple(history.get(name, ()))
                )
            else:
                models[name] = None
        return models, float(data["feature_scale"]), class_names
