"""Stage "svm": one linear SVM per class with hard-negative mining (paper section 4.1).

Following the authors' release (itself R-CNN's ``rcnn_train.m``):

* features of a window are taken at ``layer``: ``pool5`` is the pooled conv5 vector itself;
  ``fc6`` / ``fc7`` run it through the fc head (eval mode, after ReLU) of the features
  artifact's net, or of the fine-tuned net when ``finetuned`` (:mod:`sppcli.stages.finetune`);
* features are multiplied by ``target_norm / mean_norm`` with the mean L2 norm estimated on a
  fixed random sample of training windows (200 images x 200 windows, R-CNN's
  ``rcnn_feature_stats``; seed :data:`sppcli.detector.windows.NORM_SEED`);
* positives of class c: its ground-truth windows, difficult ones included (both releases keep
  difficult objects in training: R-CNN's ``roidb_from_voc`` reads every object, and the SPP
  release's experiment scripts call theirs with ``with_hard_samples = false``, which keeps them);
* negatives of class c: windows (proposals and other classes' ground truths) whose IoU with
  every ground truth of c is ``< neg_iou``, deduplicated per image (:func:`image_negatives`) by
  the paper's rule (``svm.neg_dedup = "iou"``: a window overlapping an earlier kept one by more
  than ``neg_dedup_iou`` is dropped) or the release's (``"cells"``: one window per distinct conv5
  cells and scale);
* hard-negative mining is :func:`sppcli.detector.svm.train_class_svm` (one pass over the images).

Every class is trained in the same pass over the images: each image's pool item is read and its
layer features are computed once, then handed to every class. Each class's
:func:`~sppcli.detector.svm.train_class_svm` consumes its own stream in a thread of its own, used as a
coroutine (one thread works at a time; see :func:`train_all_classes`), so each model is exactly
the one a separate pass per class would give.

A class without positives is skipped with a warning (``metrics["skipped_classes"]``); it gets no
model and detection gives it no detections.

Output: ``svms.npz`` (:func:`sppcli.detector.svm.save_svms`: weights, biases, feature scale, class
names, training params and per-retrain history). ``metrics["head"]`` records the layer and the
net whose head computes it (``path`` and ``arch`` as in a features manifest's ``metrics["net"]``,
plus ``pool_levels``); :func:`for_svm` rebuilds the same feature function from it for detection.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from sppcli.artifacts import Manifest, StageRun
from sppcli.config import STORAGE_DTYPES, Config, SvmParams
from sppcli.nets.heads import FC_LAYERS, detection_head, fc_features
from sppcli.nets.net_source import load_net
from sppcli.parallel import progress, resolve_device, single_torch_thread
from sppcli.stages.pool import pooled_features_of
from sppcli.detector.svm import (
    NoNegativesError,
    SvmModel,
    dedup_negatives,
    feature_scale,
    unique_windows,
    save_svms,
    train_class_svm,
)
from sppcli.detector.pooled_features import PooledFeatures
from sppcli.detector.windows import distinct_windows, mean_feature_norm, read_pool_windows, svm_negative_rows, svm_positive_rows

Params = SvmParams
log = logging.getLogger(__name__)

OUTPUT = "svms.npz"


def params_from(config: Config) -> SvmParams:
    return config.svm


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The training split's pool items and the net whose head computes fc6 / fc7.

    Attributes:
        pool: pool manifest of the training split.
        features: features manifest (its ``metrics["net"]`` is the pretrained net).
        finetune: finetune manifest when ``finetuned`` and the layer is fc6 / fc7, else None.
        image_ids: training images, in the order hard-negative mining visits them.
        classes: class names, label order.
        device: where the fc head runs.
    """

    pool: Manifest
    features: Manifest
    finetune: Manifest | None
    image_ids: tuple[str, ...]
    classes: tuple[str, ...]
    device: str = "cpu"


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    dataset = planner.dataset(plan.split)
    pool = upstream["pool"]
    return Inputs(pool=pool, features=upstream["features"], finetune=upstream.get("finetune"),
                  image_ids=tuple(dataset.ids), classes=tuple(pool.metrics.get("classes") or dataset.classes),
                  device=resolve_device(options.device))


def check_params(params: SvmParams) -> None:
    if params.layer not in FC_LAYERS:
        raise ValueError(f"svm.layer must be one of {', '.join(FC_LAYERS)}, got {params.layer!r}")
    if params.C <= 0 or params.target_norm <= 0 or params.bias_value <= 0 or params.pos_loss_weight <= 0:
        raise ValueError("svm.C, svm.target_norm, svm.bias_value and svm.pos_loss_weight must be > 0")
    if not 0 < params.neg_iou <= 1 or not 0 < params.neg_dedup_iou <= 1:
        raise ValueError("svm.neg_iou and svm.neg_dedup_iou must be in (0, 1]")
    if params.retrain_limit < 0:
        raise ValueError(f"svm.retrain_limit must be >= 0, got {params.retrain_limit}")
    if params.max_cache < 0:
        raise ValueError(f"svm.max_cache must be >= 0 (0 = no bound), got {params.max_cache}")
    if params.neg_dedup not in NEG_DEDUPS:
        raise ValueError(f"svm.neg_dedup = {params.neg_dedup!r}; use one of {', '.join(NEG_DEDUPS)}")
    if params.cache_dtype not in STORAGE_DTYPES:
        raise ValueError(f"svm.cache_dtype = {params.cache_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")


# ---------------------------------------------------------------------------------------------
# features at the SVM's layer


class LayerFeatures:
    """Pooled vectors -> features at ``layer`` (pool5: the vector itself; fc6/fc7: the head).

    Build it with :meth:`from_record` from an SVM manifest's ``metrics["head"]`` (or
    :func:`for_svm`), so that detection computes exactly the features the SVMs were trained on.

    Attributes:
        layer: ``pool5``, ``fc6`` or ``fc7``.
        head: the fc head with fc6 taking the pool items' level order (None for pool5).
        dim: length of the layer's feature vectors.
    """

    def __init__(self, layer: str, head, device: str, pooled_dim: int, precision=None):
        self.layer = layer
        self.head = head
        self.device = device
        self.precision = precision
        self.dim = int(pooled_dim) if layer == "pool5" else int(head.hidden)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], device: str = "cpu") -> "LayerFeatures":
        """Rebuild from a :func:`head_record` dict (the net file must still exist)."""
        if record["layer"] == "pool5":
            return cls("pool5", None, device, record["pooled_dim"])
        path = Path(record["path"])
        if not path.is_file():
            raise FileNotFoundError(f"the net {path} behind these SVMs' {record['layer']} features is gone; "
                                    "rerun the stage that made it (or `sppcli train-svm --force`)")
        net, _ = load_net(path, record["arch"], map_location="cpu")
        head = detection_head(net, record["pool_levels"]).to(device).eval()
        return cls(record["layer"], head, device, record["pooled_dim"])

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        """float32 ``[N, D_layer]`` from pooled ``[N, D]`` (any float dtype), eval mode."""
        return fc_features(self.head, pooled, self.layer, self.device, precision=self.precision)


def window_features(pooled: PooledFeatures, windows, rows: np.ndarray, layer: LayerFeatures
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled vectors and ``layer`` features of a table's windows ``rows``, each distinct
    (scale, cells) window computed once: ``(pooled [U, D], features [U, D_layer], inverse [n])``
    with row ``i`` of the request at ``inverse[i]``."""
    rows = np.asarray(rows, dtype=np.int64)
    first, inverse = distinct_windows(windows.scale_index[rows], windows.cells[rows])
    vectors = pooled.window_rows(windows, rows[first])
    return vectors, layer(vectors), inverse


def for_svm(manifest: Manifest, device: str = "cpu") -> LayerFeatures:
    """The feature function an SVM artifact was trained with."""
    return LayerFeatures.from_record(manifest.metrics["head"], device)


def head_record(params: SvmParams, inputs: Inputs) -> dict[str, Any]:
    """What computes the SVM's layer: ``{"layer", "pool_levels", "pooled_dim", "source", "path",
    "arch"}``; source/path/arch as in a features manifest's ``metrics["net"]`` (``"pool"``,
    None, None for pool5), from the fine-tuned net when ``finetuned``."""
    record: dict[str, Any] = {"layer": params.layer,
                              "pool_levels": [int(n) for n in inputs.pool.metrics["levels"]],
                              "pooled_dim": int(inputs.pool.metrics["feature_dim"])}
    if params.layer == "pool5":
        record.update({"source": "pool", "path": None, "arch": None})
        return record
    if params.finetuned:
        if inputs.finetune is None:
            raise ValueError("svm.finetuned = true needs the finetune artifact; run `sppcli finetune-fc` first")
        net_record = inputs.finetune.metrics["net"]
    else:
        net_record = inputs.features.metrics["net"]
    record.update({k: net_record[k] for k in ("source", "path", "arch")})
    return record


# ---------------------------------------------------------------------------------------------
# passes over the pool items


def collect_positives(paths: Sequence[Path], pooled: PooledFeatures, num_classes: int, features: LayerFeatures,
                      scale: float) -> list[np.ndarray]:
    """Scaled layer features of every class's ground-truth windows: ``[P_c, D]`` per class."""
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for path in progress(paths, total=len(paths), desc="svm: positives"):
        windows = read_pool_windows(path)
        gt_rows = np.flatnonzero(windows.is_gt)
        if gt_rows.size == 0:
            continue
        _, distinct, inverse = window_features(pooled, windows, gt_rows, features)
        feats = distinct[inverse] * np.float32(scale)
        for c in range(num_classes):
            rows = svm_positive_rows(windows.is_gt[gt_rows], windows.gt_label[gt_rows], c)
            if rows.size:
                per_class[c].append(feats[rows])
    return [np.concatenate(parts) if parts else np.zeros((0, features.dim), np.float32) for parts in per_class]


NEG_DEDUPS = ("iou", "cells")


def image_negatives(windows, num_classes: int, neg_iou: float, dedup_iou: float, dedup: str = "iou"
                    ) -> list[np.ndarray]:
    """Per class, the rows of one image's deduplicated negatives (int64, ascending).

    ``dedup``: ``"iou"``, the paper's rule, drops a class's negative that overlaps an earlier
    kept one by more than ``dedup_iou`` (:func:`sppcli.detector.svm.dedup_negatives`);
    ``"cells"``, the release's (``spp_train.m`` through ``spp_features_convX_to_poolX`` with
    ``dedup``), keeps one window per distinct (conv5 cells, scale) among all the image's windows,
    the first, and each class's negatives are those of its candidates that were kept: windows
    with identical vectors are one negative, and far more negatives survive than under the
    paper's rule. Classes absent from the image share one candidate set (every window), so its
    deduplication is computed once.
    """
    if dedup not in NEG_DEDUPS:
        raise ValueError(f"svm.neg_dedup = {dedup!r}; use one of {', '.join(NEG_DEDUPS)}")
    distinct = np.zeros(len(windows), dtype=bool)
    if dedup == "cells":
        distinct[unique_windows(windows.cells, windows.scale_index)] = True
    memo: dict[bytes, np.ndarray] = {}
    out = []
    for c in range(num_classes):
        column = windows.overlaps[:, c] if windows.overlaps.shape[1] else np.zeros(len(windows), np.float32)
        rows = svm_negative_rows(column, neg_iou)
        key = rows.tobytes()
        if key not in memo:
            memo[key] = rows[distinct[rows]] if dedup == "cells" else rows[dedup_negatives(windows.boxes[rows],
                                                                                          dedup_iou)]
        out.append(memo[key])
    return out


# ---------------------------------------------------------------------------------------------
# one pass, every class


class _Abort(Exception):
    pass


_END = object()
_ABORT = object()


class _ClassStream:
    """The negative stream of one class's trainer thread, fed one batch at a time.

    The trainer runs only between receiving a batch and asking for the next one; the feeder
    waits for that request before going on. So at most one thread works at any moment, which
    keeps every model deterministic: liblinear, under scikit-learn, seeds the C library's
    global ``rand()`` before each solve, and two solves in parallel threads would draw from
    each other's sequence.
    """

    def __init__(self) -> None:
        self.inbox: queue.Queue = queue.Queue(maxsize=1)
        self.requests: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            self.requests.put(True)
            item = self.inbox.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Abort()
            yield item


def train_all_classes(positives: Sequence[np.ndarray], negative_batches: Iterator[list[np.ndarray]],
                      params: SvmParams, names: Sequence[str], log_line: Callable[[str, str], None]
                      ) -> dict[int, SvmModel | Exception]:
    """Train the classes with positives, all from one iterator of per-image batches.

    Each class's :func:`sppcli.detector.svm.train_class_svm` runs in a thread of its own, used as a
    coroutine: it gets its batch of an image, works until it asks for the next one, and only
    then does the next class (or the next image) go on. The result for each class is exactly
    that of ``train_class_svm(positives[c], [batches[c] for batches in negative_batches])``.

    Args:
        positives: scaled positives ``[P_c, D]`` per class; classes with ``P_c == 0`` are not
            trained.
        negative_batches: per image, a list with one scaled ``[n, D]`` negative batch per class
            (entries of untrained classes are ignored).
        names: class names, for log lines.
        log_line: ``log_line(class_name, line)`` after each retrain.

    Returns:
        class index -> its :class:`~sppcli.detector.svm.SvmModel`, or the
        :class:`~sppcli.detector.svm.NoNegativesError` that stopped it.
    """
    active = [c for c, p in enumerate(positives) if len(p)]
    streams = {c: _ClassStream() for c in active}
    results: dict[int, SvmModel | Exception] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(active)),
                                               thread_name_prefix="svm") as pool:
        futures = {c: pool.submit(train_class_svm, positives[c], iter(streams[c]), params,
                                  lambda line, name=names[c]: log_line(name, line))
                   for c in active}

        def wait_for(c: int) -> None:
            # Until class c asks for its next batch, or its trainer has ended.
            while True:
                try:
                    streams[c].requests.get(timeout=0.05)
                    return
                except queue.Empty:
                    if futures[c].done():
                        error = futures[c].exception()
                        if error is not None and not isinstance(error, NoNegativesError):
                            raise error
                        return

        def give(c: int, item: Any) -> None:
            if not futures[c].done():
                streams[c].inbox.put(item)
                wait_for(c)

        try:
            for c in active:
                wait_for(c)
            for batches in negative_batches:
                for c in active:
                    give(c, batches[c])
            for c in active:
                give(c, _END)
                try:
                    results[c] = futures[c].result()
                except NoNegativesError as error:
                    results[c] = error
        except BaseException:
            # Replace any batch not taken yet by an abort; each trainer ends at its next request.
            for c in active:
                with contextlib.suppress(queue.Empty):
                    streams[c].inbox.get_nowait()
                streams[c].inbox.put_nowait(_ABORT)
            raise
    return results


def mining_batches(paths: Sequence[Path], pooled: PooledFeatures, num_classes: int, features: LayerFeatures,
                   scale: float, params: SvmParams, counts: list[int]) -> Iterator[list[np.ndarray]]:
    """Per image, every class's scaled, deduplicated negatives (features computed once per
    image, then handed to every class).

    ``counts[c]`` accumulates the negatives offered to class c.
    """
    for path in progress(paths, total=len(paths), desc="svm: mining"):
        windows = read_pool_windows(path)
        rows = image_negatives(windows, num_classes, params.neg_iou, params.neg_dedup_iou, params.neg_dedup)
        needed = np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
        feats = np.zeros((0, features.dim), np.float32)
        if needed.size:
            _, distinct, inverse = window_features(pooled, windows, needed, features)
            feats = distinct[inverse] * np.float32(scale)
        # Classes absent from the image share one negative set: hand them one array (the
        # trainers only read it) rather than a copy each.
        shared: dict[bytes, np.ndarray] = {}
        batches = []
        for c in range(num_classes):
            counts[c] += len(rows[c])
            key = rows[c].tobytes()
            if key not in shared:
                shared[key] = feats[np.searchsorted(needed, rows[c])]
            batches.append(shared[key])
        yield batches


@single_torch_thread()  # small matrix work: a second OpenMP thread only waits on a busy core
def run(params: SvmParams, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    started = time.perf_counter()
    classes = list(inputs.classes)
    paths = [inputs.pool.item_path(i) for i in inputs.image_ids]

    head = head_record(params, inputs)
    layer_features = LayerFeatures.from_record(head, inputs.device)
    pooled = pooled_features_of(inputs.pool, inputs.features)
    mean_norm, n_norm = mean_feature_norm(paths, pooled, layer_features,
                                          progress=lambda it, total: progress(it, total=total, desc="svm: norms"))
    scale = feature_scale(mean_norm, params.target_norm)
    log.info("svm: layer %s, mean feature norm %.3f over %d windows, scale %.5g", params.layer, mean_norm,
             n_norm, scale)

    positives = collect_positives(paths, pooled, len(classes), layer_features, scale)
    dim = layer_features.dim
    skipped = [{"class": classes[c], "reason": "no positives"} for c, p in enumerate(positives) if len(p) == 0]
    for entry in skipped:
        log.warning("svm: class %r has no ground-truth windows in the training set; it gets no SVM and no "
                    "detections", entry["class"])
    for c, p in enumerate(positives):
        if len(p):
            log.info("svm: %14s has %6d positives", classes[c], len(p))
    if len(skipped) == len(classes):
        raise ValueError("no class has a ground-truth window in the training set; nothing to train")

    offered = [0] * len(classes)
    t_mine = time.perf_counter()
    results = train_all_classes(
        positives, mining_batches(paths, pooled, len(classes), layer_features, scale, params, offered), params,
        classes, lambda name, line: log.info("svm %s: %s", name, line))
    mining_seconds = time.perf_counter() - t_mine

    models: dict[str, SvmModel | None] = {name: None for name in classes}
    history: dict[str, list] = {}
    for c, result in sorted(results.items()):
        if isinstance(result, Exception):
            log.warning("svm: class %r: %s; it gets no SVM", classes[c], result)
            skipped.append({"class": classes[c], "reason": str(result)})
            continue
        models[classes[c]] = result
        history[classes[c]] = list(result.history)
    save_svms(out.dir / OUTPUT, models, scale, classes, params)

    metrics = {
        "layer": params.layer,
        "finetuned": bool(params.finetuned and params.layer != "pool5"),
        "head": head,
        "feature_dim": dim,
        "mean_norm": mean_norm,
        "norm_windows": n_norm,
        "feature_scale": scale,
        "classes": classes,
        "trained_classes": [name for name in classes if models[name] is not None],
        "skipped_classes": skipped,
        "positives": {classes[c]: int(len(p)) for c, p in enumerate(positives)},
        "negatives_offered": {classes[c]: int(n) for c, n in enumerate(offered)},
        # The most negatives a class's cache held at a retrain, and the caches' memory had every
        # class peaked at once: an upper bound on what mining held.
        "cache_peak_windows": {name: max((h["n_cache"] for h in hist), default=0) for name, hist in history.items()},
        "cache_bound_bytes": int(sum(max((h["n_cache"] for h in hist), default=0) for hist in history.values())
                                 * dim * np.dtype(params.cache_dtype).itemsize),
        "history": history,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out.finish(metrics=metrics, timings={"mining_seconds": round(mining_seconds, 3)},
                      device=inputs.device)
