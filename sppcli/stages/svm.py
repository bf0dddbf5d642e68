"""Stage "svm": one linear SVM per class with hard-negative mining (paper section 4.1).

Following the authors' release (itself R-CNN's ``rcnn_train.m``):

* features of a window are taken at ``layer``: ``pool5`` is the pooled conv5 vector itself;
  ``fc6`` / ``fc7`` run it through the fc head (eval mode, after ReLU) of the features
  artifact's net, or of the fine-tuned net when ``finetuned`` (:mod:`sppcli.stages.finetune`);
* features are multiplied by ``target_norm / mean_norm`` with the mean L2 norm estimated on a
  fixed random sample of training windows (200 images x 200 windows, R-CNN's
  ``rcnn_feature_stats``; seed :data:`NORM_SEED`);
* positives of class c: its ground-truth windows, difficult ones included (both releases keep
  difficult objects in training: R-CNN's ``roidb_from_voc`` reads every object, and the SPP
  release's experiment scripts call theirs with ``with_hard_samples = false``, which keeps them);
* negatives of class c: windows (proposals and other classes' ground truths) whose IoU with
  every ground truth of c is ``< neg_iou``, of which a window overlapping an earlier kept one by
  more than ``neg_dedup_iou`` is dropped (:func:`sppcli.svm.dedup_negatives`, per image);
* hard-negative mining is :func:`sppcli.svm.train_class_svm` (one pass over the images).

Every class is trained in the same pass over the images: each image's pool item is read and its
layer features are computed once, then handed to every class. Each class's
:func:`~sppcli.svm.train_class_svm` consumes its own stream in a thread of its own (bounded
queues keep at most two images per class in flight), so the per-class models, which depend only
on the order of their own streams, are the same as with one pass per class.

A class without positives is skipped with a warning (``metrics["skipped_classes"]``); it gets no
model and detection gives it no detections.

Output: ``svms.npz`` (:func:`sppcli.svm.save_svms`: weights, biases, feature scale, class
names, training params and per-retrain history). ``metrics["head"]`` records the layer and the
net whose head computes it (``path`` and ``arch`` as in a features manifest's ``metrics["net"]``,
plus ``pool_levels``), which is what detection needs to compute the same features.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from sppcli.artifacts import Manifest, StageRun
from sppcli.config import Config, SvmParams as StageSvmParams
from sppcli.feature_net import FC_LAYERS, detection_head, fc_features, load_net, load_net_for_features
from sppcli.parallel import progress
from sppcli.pipeline import VERSIONS, resolve_device
from sppcli.svm import (
    NoNegativesError,
    SvmModel,
    SvmParams as TrainParams,
    dedup_negatives,
    feature_scale,
    save_svms,
    train_class_svm,
)
from sppcli.window_sampling import mean_feature_norm, read_pool_windows, svm_negative_rows, svm_positive_rows

VERSION = VERSIONS["svm"]
Params = StageSvmParams
log = logging.getLogger(__name__)

OUTPUT = "svms.npz"
NORM_SEED = 3  # R-CNN's seed_rand() seed for its feature statistics
NORM_IMAGES = 200
NORM_WINDOWS_PER_IMAGE = 200
QUEUE_DEPTH = 2


def params_from(config: Config) -> StageSvmParams:
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


def check_params(params: StageSvmParams) -> None:
    if params.layer not in FC_LAYERS:
        raise ValueError(f"svm.layer must be one of {', '.join(FC_LAYERS)}, got {params.layer!r}")
    if params.C <= 0 or params.target_norm <= 0 or params.bias_value <= 0 or params.pos_loss_weight <= 0:
        raise ValueError("svm.C, svm.target_norm, svm.bias_value and svm.pos_loss_weight must be > 0")
    if not 0 < params.neg_iou <= 1 or not 0 < params.neg_dedup_iou <= 1:
        raise ValueError("svm.neg_iou and svm.neg_dedup_iou must be in (0, 1]")
    if params.retrain_limit < 0:
        raise ValueError(f"svm.retrain_limit must be >= 0, got {params.retrain_limit}")


# ---------------------------------------------------------------------------------------------
# features at the SVM's layer


class LayerFeatures:
    """Pooled vectors -> features at ``layer`` (pool5: the vector itself; fc6/fc7: the head).

    Attributes:
        dim: length of the layer's feature vectors.
    """

    def __init__(self, layer: str, head, device: str, pooled_dim: int):
        self.layer = layer
        self.head = head
        self.device = device
        self.dim = int(pooled_dim) if layer == "pool5" else int(head.hidden)

    def __call__(self, pooled: np.ndarray) -> np.ndarray:
        """float32 ``[N, D_layer]`` from pooled ``[N, D]`` (any float dtype)."""
        return fc_features(self.head, pooled, self.layer, self.device)


def head_record(params: StageSvmParams, inputs: Inputs) -> tuple[LayerFeatures, dict[str, Any]]:
    """The layer's feature function and the ``metrics["head"]`` record that rebuilds it."""
    pool_levels = [int(n) for n in inputs.pool.metrics["levels"]]
    record: dict[str, Any] = {"layer": params.layer, "pool_levels": pool_levels}
    if params.layer == "pool5":
        record.update({"source": "pool", "path": None, "arch": None})
        return LayerFeatures("pool5", None, inputs.device, inputs.pool.metrics["feature_dim"]), record
    if params.finetuned:
        if inputs.finetune is None:
            raise ValueError("svm.finetuned = true needs the finetune artifact; run `sppcli finetune-fc` first")
        net_record = dict(inputs.finetune.metrics["net"])
        net, _ = load_net(net_record["path"], None, map_location="cpu")
    else:
        net_record = dict(inputs.features.metrics["net"])
        net, _ = load_net_for_features(inputs.features, map_location="cpu")
    record.update({k: net_record[k] for k in ("source", "path", "arch")})
    head = detection_head(net, pool_levels).to(inputs.device).eval()
    return LayerFeatures(params.layer, head, inputs.device, inputs.pool.metrics["feature_dim"]), record


# ---------------------------------------------------------------------------------------------
# passes over the pool items


def collect_positives(paths: Sequence[Path], num_classes: int, features: LayerFeatures, scale: float
                      ) -> list[np.ndarray]:
    """Scaled layer features of every class's ground-truth windows: ``[P_c, D]`` per class."""
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for path in progress(paths, total=len(paths), desc="svm: positives"):
        windows = read_pool_windows(path)
        gt_rows = np.flatnonzero(windows.is_gt)
        if gt_rows.size == 0:
            continue
        feats = features(windows.read_features(gt_rows)) * np.float32(scale)
        for c in range(num_classes):
            rows = svm_positive_rows(windows.is_gt[gt_rows], windows.gt_label[gt_rows], c)
            if rows.size:
                per_class[c].append(feats[rows])
    return [np.concatenate(parts) if parts else np.zeros((0, features.dim), np.float32) for parts in per_class]


def image_negatives(windows, num_classes: int, neg_iou: float, dedup_iou: float) -> list[np.ndarray]:
    """Per class, the rows of one image's deduplicated negatives (int64, ascending).

    Classes absent from the image share one candidate set (every window), so its
    deduplication is computed once.
    """
    memo: dict[bytes, np.ndarray] = {}
    out = []
    for c in range(num_classes):
        column = windows.overlaps[:, c] if windows.overlaps.shape[1] else np.zeros(len(windows), np.float32)
        rows = svm_negative_rows(column, neg_iou)
        key = rows.tobytes()
        if key not in memo:
            memo[key] = rows[dedup_negatives(windows.boxes[rows], dedup_iou)]
        out.append(memo[key])
    return out


# ---------------------------------------------------------------------------------------------
# one pass, every class


class _Abort(Exception):
    pass


_END = object()
_ABORT = object()


def _stream(q: "queue.Queue") -> Iterator[np.ndarray]:
    while True:
        item = q.get()
        if item is _END:
            return
        if item is _ABORT:
            raise _Abort()
        yield item


def train_all_classes(positives: Sequence[np.ndarray], negative_batches: Iterator[list[np.ndarray | None]],
                      params: TrainParams, names: Sequence[str], log_line: Callable[[str, str], None]
                      ) -> dict[int, SvmModel | Exception]:
    """Train the classes with positives, all from one iterator of per-image batches.

    Args:
        positives: scaled positives ``[P_c, D]`` per class; classes with ``P_c == 0`` are not
            trained.
        negative_batches: per image, a list with one scaled ``[n, D]`` negative batch per class
            (entries of untrained classes may be None).
        names: class names, for log lines.
        log_line: ``log_line(class_name, line)`` after each retrain.

    Returns:
        class index -> its :class:`~sppcli.svm.SvmModel`, or the
        :class:`~sppcli.svm.NoNegativesError` that stopped it.
    """
    active = [c for c, p in enumerate(positives) if len(p)]
    queues = {c: queue.Queue(maxsize=QUEUE_DEPTH) for c in active}
    results: dict[int, SvmModel | Exception] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(active)),
                                               thread_name_prefix="svm") as pool:
        futures = {c: pool.submit(train_class_svm, positives[c], _stream(queues[c]), params,
                                  lambda line, name=names[c]: log_line(name, line))
                   for c in active}

        def put(c: int, item: Any) -> None:
            # A class whose thread died no longer reads its queue: never block on it, and stop
            # the pass at once if it died of anything but a lack of negatives.
            while not futures[c].done():
                try:
                    queues[c].put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            error = futures[c].exception()
            if error is not None and not isinstance(error, NoNegativesError):
                raise error

        try:
            for batches in negative_batches:
                for c in active:
                    put(c, batches[c])
            for c in active:
                put(c, _END)
        except BaseException:
            for c in active:
                _drain(queues[c])
                queues[c].put(_ABORT)
            raise
        for c in active:
            try:
                results[c] = futures[c].result()
            except NoNegativesError as error:
                results[c] = error
    return results


def _drain(q: "queue.Queue") -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def mining_batches(paths: Sequence[Path], num_classes: int, features: LayerFeatures, scale: float,
                   params: StageSvmParams, counts: list[int]) -> Iterator[list[np.ndarray]]:
    """Per image, every class's scaled, deduplicated negatives (features computed once).

    ``counts[c]`` accumulates the negatives offered to class c.
    """
    for path in progress(paths, total=len(paths), desc="svm: mining"):
        windows = read_pool_windows(path)
        rows = image_negatives(windows, num_classes, params.neg_iou, params.neg_dedup_iou)
        needed = np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
        feats = np.zeros((0, features.dim), np.float32)
        if needed.size:
            feats = features(windows.read_features(needed)) * np.float32(scale)
        batches = []
        for c in range(num_classes):
            counts[c] += len(rows[c])
            batches.append(feats[np.searchsorted(needed, rows[c])])
        yield batches


def run(params: StageSvmParams, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    started = time.perf_counter()
    classes = list(inputs.classes)
    paths = [inputs.pool.item_path(i) for i in inputs.image_ids]
    train_params = TrainParams.from_fields(params)

    layer_features, head = head_record(params, inputs)
    mean_norm, n_norm = mean_feature_norm(paths, layer_features, NORM_SEED, NORM_IMAGES, NORM_WINDOWS_PER_IMAGE,
                                          progress=lambda it, total: progress(it, total=total, desc="svm: norms"))
    scale = feature_scale(mean_norm, params.target_norm)
    log.info("svm: layer %s, mean feature norm %.3f over %d windows, scale %.5g", params.layer, mean_norm,
             n_norm, scale)

    positives = collect_positives(paths, len(classes), layer_features, scale)
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
        positives, mining_batches(paths, len(classes), layer_features, scale, params, offered), train_params,
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
    save_svms(out.dir / OUTPUT, models, scale, classes, train_params)

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
        "history": history,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out.finish(metrics=metrics, timings={"mining_seconds": round(mining_seconds, 3)},
                      device=inputs.device)
