"""`sppcli detect`: score every window with the SVMs, threshold, NMS, write result files.

Two passes:

1. per image (resumable HDF5 items): window features at the SVMs' layer, scores of every class,
   and per class :func:`class_detections`: the windows above ``score_threshold``, NMS at
   ``nms_iou``, at most ``max_per_image`` of the class, bounding-box regression, in the order
   ``detect.order`` names (``"release"``: the SPP release's ``spp_test.m`` followed by
   ``spp_test_bbox_regressor.m`` and its evaluation's NMS);
2. over the whole split (:func:`select_detections`): per class, the threshold is raised to keep
   at most ``max_per_class_factor x #images`` windows. ``rcnn_test.m`` tightens it as it goes;
   the SPP release's ``spp_test.m`` means to but, as released, never does (its ``keep_top_k``
   runs for the last class only and its final pass reads an empty list), so there only the
   -1.5 threshold and the per-image cap apply. Since thresholding and NMS commute (a suppressor
   always scores higher than what it suppresses), tightening after per-image NMS keeps the set
   the running threshold would.

Outputs: ``detections.h5`` (all kept detections), VOC devkit result files
``comp4_det_<split>_<class>.txt`` (1-based pixels) and a COCO-style ``detections.json``.
Proposals only are scored: ground-truth rows of the pool items are training data.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from sppcli.artifacts import ITEMS, MANIFEST, Manifest, StageRun, atomic_path, atomic_write_json, item_means
from sppcli.config import DetectParams
from sppcli.data.coco import results_file
from sppcli.parallel import map_images, progress, resolve_device, single_torch_thread
from sppcli.stages.pool import pooled_features_of

Params = DetectParams
log = logging.getLogger(__name__)

DETECTIONS = "detections.h5"


def params_from(config) -> Params:
    return config.detect


@dataclasses.dataclass(frozen=True)
class Inputs:
    dataset: object
    pool: Manifest
    features: Manifest
    svm: Manifest
    bbox_reg: Manifest | None
    combine: tuple[Path, ...]
    device: str
    workers: int
    scheduler: str | None


def inputs_for(planner, plan, upstream, options) -> Inputs:
    params = params_from(planner.config)
    combine = tuple(Path(p) for p in params.combine)
    for other in combine:
        m = Manifest.read(other / MANIFEST) if (other / MANIFEST).exists() else None
        if m is None or not m.complete or m.stage != "detect":
            raise ValueError(f"--combine {other}: not a complete detect artifact directory")
        if m.dataset != plan.dataset:
            raise ValueError(f"--combine {other}: detections of {m.dataset}, not {plan.dataset}")
    return Inputs(dataset=planner.dataset(plan.split), pool=upstream["pool"], features=upstream["features"],
                  svm=upstream["svm"],
                  bbox_reg=upstream.get("bbox_reg"), combine=combine,
                  device=resolve_device(options.device), workers=options.workers, scheduler=options.scheduler)


# ---------------------------------------------------------------------------------------------
# pass 1: per image


class WindowScorer:
    """Scores of every class for pooled windows: the SVMs on the layer they were trained on, and
    the box regressors (None without them).

    Attributes:
        layer: the :class:`~sppcli.stages.svm.LayerFeatures` the SVMs read.
        W: float32 ``[D, K]``; b: float32 ``[K]`` (-inf for a class without an SVM: it never
        fires); scale: the SVMs' feature scale; class_names: ``[K]``; regressor: a
        :class:`~sppcli.detector.bbox_reg.BBoxRegressor` or None.
    """

    def __init__(self, layer, W: np.ndarray, b: np.ndarray, scale: float, class_names, regressor=None):
        self.layer, self.W, self.b, self.scale = layer, W, b, float(scale)
        self.class_names = list(class_names)
        self.regressor = regressor

    @classmethod
    def from_manifests(cls, svm_manifest: Manifest, bbox_reg_manifest: Manifest | None, device: str,
                       svd_ranks: tuple[int, int] = (0, 0), precision: str = "float32") -> "WindowScorer":
        from sppcli.detector.bbox_reg import load_regressor
        from sppcli.detector.svm import load_svms
        from sppcli.stages.svm import for_svm

        models, scale, class_names = load_svms(svm_manifest.path("svms.npz"))
        dim = next(m.w.shape[0] for m in models.values() if m is not None)
        W = np.zeros((dim, len(class_names)), dtype=np.float32)
        b = np.full(len(class_names), -np.inf, dtype=np.float32)  # untrained class: never fires
        for k, name in enumerate(class_names):
            if models[name] is not None:
                W[:, k] = models[name].w
                b[k] = models[name].b
        regressor = None
        if bbox_reg_manifest is not None:
            regressor, reg_classes = load_regressor(bbox_reg_manifest.path("bbox_reg.npz"))
            if reg_classes is not None and list(reg_classes) != list(class_names):
                raise ValueError(f"bbox regressors are for classes {reg_classes}, SVMs for {class_names}")
        return cls(speed_up(for_svm(svm_manifest, device), svd_ranks, precision), W, b, scale, class_names,
                   regressor)

    def __call__(self, pooled: np.ndarray) -> tuple[np.ndarray, float]:
        """(scores float32[N, K], seconds spent in fc layers) for pooled features [N, D]."""
        t0 = time.perf_counter()
        feats = self.layer(pooled)
        fc_seconds = time.perf_counter() - t0
        return (feats * self.scale) @ self.W + self.b, fc_seconds


def speed_up(layer, svd_ranks: Sequence[int], precision: str):
    """``layer`` with ``detect.svd_ranks`` and ``detect.precision`` applied to its head."""
    from sppcli.nets.heads import truncated_svd_head

    if layer.head is not None and any(svd_ranks):
        layer.head = truncated_svd_head(layer.head, *svd_ranks).to(layer.device)
    layer.precision = PRECISIONS[precision]
    return layer


@functools.lru_cache(maxsize=2)
def _scorer(svm_dir: str, bbox_dir: str | None, device: str, svd_ranks: tuple[int, int] = (0, 0),
            precision: str = "float32") -> WindowScorer:
    # One scorer per worker process, built on first use: loading the fc head and SVMs per image
    # would dominate the per-image time.
    svm = Manifest.read(Path(svm_dir) / MANIFEST)
    bbox = Manifest.read(Path(bbox_dir) / MANIFEST) if bbox_dir else None
    return WindowScorer.from_manifests(svm, bbox, device, svd_ranks, precision)


ORDERS = ("release", "regress_first")
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def _regress(regressor, vectors: np.ndarray, inverse: np.ndarray, boxes: np.ndarray, k: int,
             rows: np.ndarray) -> np.ndarray:
    return regressor.predict(vectors[inverse[rows]], boxes[rows], np.full(rows.size, k))


def class_detections(boxes: np.ndarray, scores: np.ndarray, regress, width: int, height: int, params: Params
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One class's detections in one image: ``(boxes float32 [D, 4], scores float32 [D])`` by
    decreasing score.

    Args:
        boxes: float ``[N, 4]`` the image's proposal windows; scores: float ``[N]`` this class's.
        regress: ``regress(rows) -> [len(rows), 4]`` regressed boxes of windows ``rows``, or None.
        width, height: the image size boxes are clipped to.

    ``params.order``: ``"release"`` (``spp_test.m`` + ``spp_test_bbox_regressor.m``): keep scores
    above the threshold, NMS on the windows as proposed, keep the ``max_per_image`` best, then
    regress, clip and NMS again; ``"regress_first"``: threshold, regress, clip, NMS, keep the best.
    """
    from sppcli.ops.boxes import clip_boxes, nms

    def clipped(b: np.ndarray) -> torch.Tensor:
        return clip_boxes(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)), width, height)

    if params.order not in ORDERS:
        raise ValueError(f"detect.order = {params.order!r}; use one of {', '.join(ORDERS)}")
    keep = np.flatnonzero(scores > params.score_threshold)
    if keep.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    kept_scores = torch.from_numpy(scores[keep].astype(np.float32))
    if params.order == "release":
        first = nms(clipped(boxes[keep]), kept_scores, params.nms_iou)[: params.max_per_image].numpy()
        keep, kept_scores = keep[first], kept_scores[first]
        if regress is None:
            return clipped(boxes[keep]).numpy(), kept_scores.numpy()
        moved = clipped(regress(keep))
        second = nms(moved, kept_scores, params.nms_iou)
        return moved[second].numpy(), kept_scores[second].numpy()
    moved = clipped(regress(keep) if regress is not None else boxes[keep])
    kept = nms(moved, kept_scores, params.nms_iou)[: params.max_per_image]
    return moved[kept].numpy(), kept_scores[kept].numpy()


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDetections:
    """One image's detections of every class (before the split's per-class budget): float32
    ``boxes [D, 4]``, ``scores [D]``, int16 ``labels [D]``, and the seconds spent pooling
    windows and in the fc layers."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    pool_seconds: float
    fc_seconds: float


def detect_windows(scorer: WindowScorer, boxes: np.ndarray, scale_index: np.ndarray, cells: np.ndarray,
                   vectors_of, width: int, height: int, params: Params) -> ImageDetections:
    """Score one image's proposal windows and keep each class's detections (:func:`class_detections`).

    Args:
        boxes: float ``[N, 4]`` the windows; scale_index, cells: where each is pooled.
        vectors_of: ``rows -> [len(rows), D]`` pooled vectors of those windows (a pool artifact's
            :class:`~sppcli.detector.pooled_features.PooledFeatures`, or maps in memory).
    """
    from sppcli.detector.windows import distinct_windows

    # Windows pooling the same cells at the same scale share one vector, so one fc pass and one score.
    first, inverse = distinct_windows(scale_index, cells)
    t_pool = time.perf_counter()
    vectors = vectors_of(first)
    pool_seconds = time.perf_counter() - t_pool
    if len(boxes):
        distinct_scores, fc_seconds = scorer(vectors)
        scores = distinct_scores[inverse]
    else:
        scores, fc_seconds = np.zeros((0, len(scorer.class_names)), np.float32), 0.0
    out_boxes, out_scores, out_labels = [np.zeros((0, 4), np.float32)], [np.zeros(0, np.float32)], []
    for k in range(scores.shape[1]):
        regress = None if scorer.regressor is None else functools.partial(
            _regress, scorer.regressor, vectors, inverse, boxes, k)
        cls_boxes, cls_scores = class_detections(boxes, scores[:, k], regress, width, height, params)
        out_boxes.append(cls_boxes)
        out_scores.append(cls_scores)
        out_labels.append(np.full(len(cls_scores), k, dtype=np.int16))
    return ImageDetections(np.concatenate(out_boxes).astype(np.float32), np.concatenate(out_scores),
                           np.concatenate(out_labels) if out_labels else np.zeros(0, np.int16),
                           pool_seconds, fc_seconds)


def detect_image(image_id: str, *, pool_item: Path, pooled, out_item: Path, svm_dir: str,
                 bbox_dir: str | None, device: str, params: Params) -> dict:
    """Pass 1 for one image: write its per-class detections (:func:`detect_windows`) to ``out_item``."""
    from sppcli.detector.windows import read_pool_windows

    t0 = time.perf_counter()
    scorer = _scorer(svm_dir, bbox_dir, device, tuple(int(r) for r in params.svd_ranks), params.precision)
    windows = read_pool_windows(pool_item, image_id)
    rows = np.flatnonzero(~windows.is_gt)
    found = detect_windows(scorer, windows.boxes[rows], windows.scale_index[rows], windows.cells[rows],
                           lambda first: pooled.window_rows(windows, rows[first]), windows.width, windows.height,
                           params)
    with atomic_path(out_item) as tmp:
        with h5py.File(tmp, "w") as f:
            f["boxes"], f["scores"], f["labels"] = found.boxes, found.scores, found.labels
            f.attrs["width"], f.attrs["height"] = windows.width, windows.height
            f.attrs["fc_seconds"] = found.fc_seconds
            f.attrs["pool_seconds"] = found.pool_seconds
            f.attrs["seconds"] = time.perf_counter() - t0
            f.attrs["n_windows"] = len(rows)
    return {"fc_seconds": found.fc_seconds, "n_windows": len(rows)}


def _read_candidates(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _read_item(path)[0]


def _read_item(path: Path) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float, int]:
    """((boxes, scores, labels), fc seconds, windows scored) of a pass-1 item."""
    with h5py.File(path, "r") as f:
        candidates = (f["boxes"][()], f["scores"][()], f["labels"][()])
        return candidates, float(f.attrs["fc_seconds"]), int(f.attrs["n_windows"])


# ---------------------------------------------------------------------------------------------
# pass 2: the whole split


def select_detections(candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_classes: int,
                      params: Params) -> list[np.ndarray]:
    """Per image, the indices of its candidates that survive the per-image cap and the per-class
    budget. ``candidates[i] = (boxes, scores, labels)`` of image i.

    The cap keeps at most ``max_per_image`` detections *per class* in each image, as both
    releases do (``spp_test.m``, ``rcnn_test.m``), never ranking one class's scores against
    another's. The budget then keeps, per class, the ``max_per_class_factor x #images`` best
    over the whole split (the threshold the releases tighten as they go; since thresholding and
    NMS commute, tightening it after per-image NMS keeps the same set).
    """
    capped = []
    for _, scores, labels in candidates:
        keep = []
        for k in np.unique(labels):
            rows = np.flatnonzero(labels == k)
            keep.append(rows[np.argsort(-scores[rows], kind="stable")[: params.max_per_image]])
        capped.append(np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64))
    budget = int(round(params.max_per_class_factor * len(candidates)))
    thresholds = np.full(n_classes, -np.inf)
    for k in range(n_classes):
        s = np.concatenate([sc[ok][lab[ok] == k] for (_, sc, lab), ok in zip(candidates, capped)]) \
            if candidates else np.zeros(0)
        if s.size > budget:
            # keep the `budget` best: the threshold is the budget-th highest score
            thresholds[k] = np.partition(s, s.size - budget)[s.size - budget]
    return [ok[scores[ok] >= thresholds[labels[ok].astype(np.int64)]] for (_, scores, labels), ok
            in zip(candidates, capped)]


def _combine(own: tuple[np.ndarray, np.ndarray, np.ndarray], others: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
             nms_iou: float):
    """Model combination (paper Table 9): the union of both models' windows, NMS per class."""
    from sppcli.ops.boxes import batched_nms

    boxes = np.concatenate([own[0]] + [o[0] for o in others]).astype(np.float32)
    scores = np.concatenate([own[1]] + [o[1] for o in others]).astype(np.float32)
    labels = np.concatenate([own[2]] + [o[2] for o in others]).astype(np.int64)
    if boxes.shape[0] == 0:
        return own
    keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), nms_iou).numpy()
    return boxes[keep], scores[keep], labels[keep].astype(np.int16)


def check_params(params: Params) -> None:
    """Raise ValueError naming the bad field and what it accepts, before any work."""
    if params.order not in ORDERS:
        raise ValueError(f"detect.order = {params.order!r}; use one of {', '.join(ORDERS)}")
    if params.precision not in PRECISIONS:
        raise ValueError(f"detect.precision = {params.precision!r}; use one of {', '.join(PRECISIONS)}")
    if len(params.svd_ranks) != 2 or min(params.svd_ranks) < 0:
        raise ValueError(f"detect.svd_ranks must be two ranks >= 0 (fc6, fc7; 0 = exact), got {list(params.svd_ranks)}")
    if params.max_per_image < 1:
        raise ValueError(f"detect.max_per_image must be >= 1, got {params.max_per_image}")


@single_torch_thread()  # small matrix work: a second OpenMP thread only waits on a busy core
def run(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    from sppcli.data.voc import internal_box_to_voc

    check_params(params)

    ds = inputs.dataset
    ids = list(ds.ids)
    if inputs.device.startswith("cuda") and inputs.workers > 1:
        log.info("detect: one process per GPU; ignoring --workers %d", inputs.workers)
    workers = 1 if inputs.device.startswith("cuda") else inputs.workers
    todo = out.pending(ids)
    fn = functools.partial(_detect_pending, pool_dir=str(inputs.pool.dir), out_dir=str(out.items_dir),
                           pooled=pooled_features_of(inputs.pool, inputs.features),
                           svm_dir=str(inputs.svm.dir),
                           bbox_dir=str(inputs.bbox_reg.dir) if inputs.bbox_reg else None,
                           device=inputs.device, params=params)
    map_images(fn, todo, workers=workers, scheduler=inputs.scheduler, desc="detect")

    class_names = list(ds.classes)
    candidates, fc_seconds, n_windows = [], [], []
    for image_id in progress(ids, total=len(ids), desc="gather"):
        cand, seconds, windows = _read_item(out.item_path(image_id))
        if inputs.combine:
            others = [_read_candidates(Path(o) / ITEMS / f"{image_id}.h5") for o in inputs.combine]
            cand = _combine(cand, others, params.nms_iou)
        candidates.append(cand)
        fc_seconds.append(seconds)
        n_windows.append(windows)
    kept = select_detections(candidates, len(class_names), params)

    image_index = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, k in enumerate(kept)]) if ids else np.zeros(0, np.int32)
    boxes = np.concatenate([c[0][k] for c, k in zip(candidates, kept)]).astype(np.float32) if ids else np.zeros((0, 4), np.float32)
    scores = np.concatenate([c[1][k] for c, k in zip(candidates, kept)]).astype(np.float32) if ids else np.zeros(0, np.float32)
    labels = np.concatenate([c[2][k] for c, k in zip(candidates, kept)]).astype(np.int16) if ids else np.zeros(0, np.int16)

    with atomic_path(out.dir / DETECTIONS) as tmp:
        with h5py.File(tmp, "w") as f:
            f["image_ids"] = np.array(ids, dtype=h5py.string_dtype())
            f["class_names"] = np.array(class_names, dtype=h5py.string_dtype())
            f["image_index"], f["labels"], f["scores"], f["boxes"] = image_index, labels, scores, boxes

    # VOC devkit result files: "<id> <score> <xmin> <ymin> <xmax> <ymax>", 1-based pixels.
    voc_boxes = internal_box_to_voc(boxes) if len(boxes) else np.zeros((0, 4))
    results = out.dir / "results"
    for k, name in enumerate(class_names):
        sel = np.flatnonzero(labels == k)
        lines = [f"{ids[image_index[i]]} {scores[i]:.6f} " + " ".join(f"{v:.1f}" for v in voc_boxes[i]) for i in sel]
        with atomic_path(results / f"comp4_det_{ds.split}_{name}.txt") as tmp:
            tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
    coco = results_file(ds, ids, image_index, labels, boxes, scores)
    atomic_write_json(out.dir / "detections.json", coco)

    metrics = {"n_detections": int(len(scores)), "n_images": len(ids),
               "fc_seconds_per_image": float(np.mean(fc_seconds)) if fc_seconds else 0.0,
               "pool_seconds_per_image": item_means(out.items_dir, ids, ["pool_seconds"])["pool_seconds"] or 0.0,
               "windows_per_image": float(np.mean(n_windows)) if n_windows else 0.0,
               "per_class": {name: int(np.sum(labels == k)) for k, name in enumerate(class_names)},
               "combined_with": [str(p) for p in inputs.combine]}
    return out.finish(metrics=metrics, n_items=len(ids), device=inputs.device)


def _detect_pending(image_id: str, *, pool_dir: str, out_dir: str, **kw) -> dict:
    return detect_image(image_id, pool_item=Path(pool_dir) / ITEMS / f"{image_id}.h5",
                        out_item=Path(out_dir) / f"{image_id}.h5", **kw)


# ---------------------------------------------------------------------------------------------
# reading the artifact back (`sppcli evaluate`, `sppcli show`)


@dataclasses.dataclass(frozen=True, eq=False)
class Detections:
    """``detections.h5`` of a detect artifact: every kept detection of the split.

    Attributes:
        image_ids: the split's images, in order; class_names: label order.
        image_index: int32 ``[D]`` into ``image_ids``; labels: int16 ``[D]``; scores: float32
        ``[D]``; boxes: float32 ``[D, 4]`` internal ``(x1, y1, x2, y2)``.
    """

    image_ids: list[str]
    class_names: list[str]
    image_index: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_detections(manifest: Manifest) -> Detections:
    with h5py.File(manifest.path(DETECTIONS), "r") as f:
        return Detections(image_ids=_strings(f["image_ids"][()]), class_names=_strings(f["class_names"][()]),
                          image_index=f["image_index"][()], labels=f["labels"][()], scores=f["scores"][()],
                          boxes=f["boxes"][()])


def draw_detections_of(manifest: Manifest, dataset, out_dir: Path, score: float, limit: int) -> list[Path]:
    """PNG per image (the ``limit`` first of the split) with its detections above ``score``."""
    from sppcli.viz import draw_detections, save_png

    dets = read_detections(manifest)
    written = []
    for i, image_id in enumerate(dets.image_ids[:limit]):
        sel = dets.image_index == i
        img = draw_detections(dataset.load_image(image_id), dets.boxes[sel], dets.labels[sel], dets.scores[sel],
                              dataset.classes, score_threshold=score)
        written.append(save_png(img, Path(out_dir) / f"{image_id}.png"))
    return written


def found_in_drawn(manifest: Manifest, dataset, score: float, limit: int):
    """:class:`~sppcli.data.voc_eval.FoundCount` of the detections ``draw_detections_of`` draws."""
    from sppcli.data.voc_eval import found_and_false

    dets = read_detections(manifest)
    shown = dets.image_ids[:limit]
    gt = {}
    for image_id in shown:
        truth = dataset.ground_truth(image_id)
        gt[image_id] = (truth.boxes, truth.labels, truth.difficult)
    drawn = (dets.image_index < len(shown)) & (dets.scores > score)
    by_class = {}
    for k, name in enumerate(dets.class_names):
        sel = np.flatnonzero(drawn & (dets.labels == k))
        by_class[name] = ([shown[i] for i in dets.image_index[sel]], dets.scores[sel], dets.boxes[sel])
    return found_and_false(gt, by_class, dets.class_names)

