"""`sppcli export` and `sppcli predict`: a trained detector on new images, without annotations.

:func:`bundle_from_artifacts` gathers what detection needs from a pipeline's complete artifacts
(the features artifact's net, or the fine-tuned one the SVMs read; the SVMs; the box regressors;
the proposals, features, pool and detect settings) into a
:class:`~sppcli.detector.bundle.DetectorBundle`. :class:`Detector` runs one on an image the way
the stages run a split: selective search (:func:`sppcli.stages.proposals.selective_search`), the
conv5 maps at every scale stored as ``features.dtype`` (:func:`sppcli.stages.features.image_maps`),
each window's scale and cells (:func:`sppcli.stages.pool.assign_windows`), its pooled vector
(:func:`sppcli.detector.pooled_features.pool_rows`), and the SVMs, NMS and box regression of
:func:`sppcli.stages.detect.detect_windows`; so an image gives the detections `detect`'s first
pass gives it. What `predict` cannot do is the split-wide per-class budget of `detect`'s second
pass (it needs the whole test set); on new images each class keeps at most
``detect.max_per_image`` windows above ``detect.score_threshold``.

Output per image: ``<stem>.json`` (``{"image", "width", "height", "detections": [{"class",
"score", "box": [x1, y1, x2, y2]}]}``, boxes in 0-based continuous pixels, by decreasing score)
and ``<stem>.png`` with the detections above ``--score`` drawn; with ``coco=True`` also one
``detections.json`` in COCO's results format.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from sppcli.artifacts import ArtifactError, atomic_write_json
from sppcli.config import DetectParams, FeatureParams, PoolParams, ProposalParams, as_dict
from sppcli.detector.bundle import DetectorBundle
from sppcli.detector.pooled_features import pool_rows
from sppcli.ops.geometry import FieldGeometry
from sppcli.parallel import progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def bundle_from_artifacts(planner) -> DetectorBundle:
    """The detector a pipeline config has trained, from its complete artifacts.

    Raises:
        ArtifactError: an artifact it needs is not complete; the message names the command.
    """
    from sppcli.detector.bbox_reg import load_regressor
    from sppcli.nets.checkpoint import arch_of
    from sppcli.nets.net_source import load_net, load_net_for_features
    from sppcli.stages.detect import WindowScorer

    c = planner.config

    def complete(plan):
        m = planner.store.manifest(plan.stage, plan.dataset, plan.key)
        if m is None or not m.complete:
            raise ArtifactError(f"export needs a complete {plan.stage} artifact for {plan.dataset}; run "
                                f"`{plan.command}` with the same --config/--set first")
        return m

    svm = complete(planner.plan("svm"))
    features = complete(planner.plan("features"))
    bbox = complete(planner.plan("bbox_reg")) if c.detect.bbox_reg else None
    head = svm.metrics["head"]
    if head["layer"] == "pool5":
        net, _ = load_net_for_features(features)
    else:
        net, _ = load_net(Path(head["path"]), head["arch"])
    scorer = WindowScorer.from_manifests(svm, None, "cpu")
    regressor = load_regressor(bbox.path("bbox_reg.npz"))[0] if bbox is not None else None
    record = features.metrics["net"]
    settings = {"proposals": as_dict(c.proposals), "features": as_dict(c.features), "pool": as_dict(c.pool),
                "detect": as_dict(c.detect)}
    return DetectorBundle(arch=arch_of(net), net_state=net.state_dict(), layer=head["layer"],
                          pool_levels=[int(n) for n in head["pool_levels"]],
                          geometry={k: record[k] for k in ("stride", "offset0", "offset")},
                          classes=scorer.class_names, svm_W=scorer.W, svm_b=scorer.b, svm_scale=scorer.scale,
                          regressor=regressor, settings=settings)


def _params(cls, values: dict):
    """A params dataclass from a bundle's JSON section (lists back to tuples; unknown keys, from a
    newer writer, left out)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})


class Detector:
    """A :class:`DetectorBundle` ready to run on images (see the module docstring)."""

    def __init__(self, bundle: DetectorBundle, device: str = "cpu"):
        from sppcli.nets.heads import detection_head
        from sppcli.stages.detect import WindowScorer, speed_up
        from sppcli.stages.features import prepare_trunk
        from sppcli.stages.svm import LayerFeatures

        self.bundle = bundle
        self.device = device
        self.proposals = _params(ProposalParams, bundle.settings["proposals"])
        self.features = _params(FeatureParams, bundle.settings["features"])
        self.pool = _params(PoolParams, bundle.settings["pool"])
        self.detect = _params(DetectParams, bundle.settings["detect"])
        net = bundle.net(device)
        self.trunk = prepare_trunk(net.trunk, self.features.memory_format)
        self.geometry = FieldGeometry(stride=int(bundle.geometry["stride"]), offset0=float(bundle.geometry["offset0"]),
                                      offset=float(bundle.geometry["offset"]))
        pooled_dim = int(net.trunk.out_channels) * sum(n * n for n in bundle.pool_levels)
        head = None if bundle.layer == "pool5" else detection_head(net, bundle.pool_levels).to(device).eval()
        layer = speed_up(LayerFeatures(bundle.layer, head, device, pooled_dim), tuple(self.detect.svd_ranks),
                         self.detect.precision)
        self.scorer = WindowScorer(layer, bundle.svm_W, bundle.svm_b, bundle.svm_scale, bundle.classes,
                                   bundle.regressor if self.detect.bbox_reg else None)

    def windows(self, image: np.ndarray) -> np.ndarray:
        """Selective-search windows of an RGB image, as the proposals stage makes them."""
        from sppcli.stages.proposals import selective_search

        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # as the stage runs it
        try:
            p = self.proposals
            return selective_search(image, p.mode, p.max_boxes, p.min_size, p.max_side)
        finally:
            cv2.setNumThreads(threads)

    def __call__(self, image: np.ndarray, boxes: np.ndarray | None = None):
        """:class:`~sppcli.stages.detect.ImageDetections` of one RGB ``[H, W, 3]`` uint8 image
        (its selective-search windows unless ``boxes`` are given)."""
        from sppcli.stages.detect import detect_windows
        from sppcli.stages.features import FeatureItem, image_maps, scale_image
        from sppcli.stages.pool import assign_windows

        height, width = image.shape[:2]
        boxes = self.windows(image) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
        scales = [int(s) for s in self.features.scales]
        resized, factors = scale_image(image, scales, self.features.max_side)
        maps, _ = image_maps(self.trunk, "image", resized, scales, self.features, self.device,
                             self.bundle.arch["trunk"])
        item = FeatureItem(width=width, height=height, scales=tuple(scales), scale_factors=tuple(factors),
                           scaled_sizes=np.array([[r.shape[2], r.shape[1]] for r in resized]),
                           map_shapes=tuple(m.shape for m in maps), maps=tuple(maps))
        scale_index, cells = assign_windows(boxes, item, self.geometry, self.pool.target_size)
        dtype = np.dtype(self.pool.dtype)

        def vectors_of(rows: np.ndarray) -> np.ndarray:
            out = np.empty((len(rows), item.map_shapes[0][0] * sum(n * n for n in self.bundle.pool_levels)), dtype)
            for s in np.unique(scale_index[rows]):
                where = np.flatnonzero(scale_index[rows] == s)
                out[where] = pool_rows(maps[int(s)], cells[rows[where]], self.bundle.pool_levels, dtype)
            return out

        with torch.inference_mode():
            return detect_windows(self.scorer, boxes, scale_index, cells, vectors_of, width, height, self.detect)


def image_files(inputs: Sequence[Path]) -> list[Path]:
    """The images named, and those inside the folders named (sorted), JPEG or PNG."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image or folder")
    if not files:
        raise ValueError(f"no .jpg/.jpeg/.png images in {', '.join(map(str, inputs))}")
    return files


def predict_images(detector: Detector, images: Sequence[Path], out_dir: Path, draw_score: float = 0.0,
                   coco: bool = False) -> list[dict]:
    """Run ``detector`` on ``images``; writes ``<stem>.json`` and ``<stem>.png`` per image under
    ``out_dir`` (and ``detections.json`` in COCO's results format with ``coco``); returns the
    per-image records."""
    from sppcli.data.voc import load_rgb
    from sppcli.viz import draw_detections, save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = detector.bundle.classes
    records, coco_rows = [], []
    for path in progress(images, total=len(images), desc="predict"):
        image = load_rgb(path)
        found = detector(image)
        order = np.argsort(-found.scores, kind="stable")
        detections = [{"class": names[int(found.labels[i])], "score": round(float(found.scores[i]), 5),
                       "box": [round(float(v), 2) for v in found.boxes[i]]} for i in order]
        record = {"image": str(path), "width": int(image.shape[1]), "height": int(image.shape[0]),
                  "detections": detections}
        atomic_write_json(out_dir / f"{path.stem}.json", record)
        save_png(draw_detections(image, found.boxes, found.labels, found.scores, names, score_threshold=draw_score),
                 out_dir / f"{path.stem}.png")
        records.append(record)
        for d in detections:
            x1, y1, x2, y2 = d["box"]
            coco_rows.append({"image_id": path.stem, "category_id": names.index(d["class"]) + 1,
                              "category": d["class"], "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                              "score": d["score"]})
    if coco:
        atomic_write_json(out_dir / "detections.json", coco_rows)
    return records
