"""`sppcli evaluate`: PASCAL VOC or COCO evaluation of a detect artifact (per-class AP, mAP, PR curves).

``evaluate.metric``: ``voc2007`` (11-point AP at ``evaluate.iou``, the devkit's rules),
``voc2010`` (area AP) or ``coco`` (pycocotools' mAP@[.5:.95], with AP50 and AP75 beside it;
``evaluate.iou`` does not apply). Every metric writes the same ``ap.json`` (``metric``, ``mAP``,
``ap`` per class, ``n_positives``, ``n_detections``; ``coco`` adds ``AP50``, ``AP75`` and
``ap50`` per class), ``table.txt`` and ``pr_curves.png``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sppcli.artifacts import Manifest, StageRun, atomic_write_bytes, atomic_write_json, json_number
from sppcli.config import EvaluateParams

Params = EvaluateParams


def params_from(config) -> Params:
    return config.evaluate


@dataclasses.dataclass(frozen=True)
class Inputs:
    dataset: object  # VocDataset of the evaluated split
    detections: Manifest


def inputs_for(planner, plan, upstream, options) -> Inputs:
    return Inputs(dataset=planner.dataset(plan.split), detections=upstream["detect"])


def detections_by_class(manifest: Manifest) -> tuple[list[str], dict[str, tuple[list[str], np.ndarray, np.ndarray]]]:
    """(image ids, class name -> (image ids [D], scores [D], boxes [D,4])) of a detect artifact."""
    from sppcli.stages.detect import read_detections

    dets = read_detections(manifest)
    by_class = {}
    for k, name in enumerate(dets.class_names):
        sel = dets.labels == k
        by_class[name] = ([dets.image_ids[i] for i in dets.image_index[sel]], dets.scores[sel], dets.boxes[sel])
    return dets.image_ids, by_class


METRICS = ("voc2007", "voc2010", "coco")


def run(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    from sppcli.data.voc_eval import format_ap_table
    from sppcli.viz import plot_pr_curves

    if params.metric not in METRICS:
        raise ValueError(f"evaluate.metric = {params.metric!r}; use one of {', '.join(METRICS)}")
    ds = inputs.dataset
    ids, dets = detections_by_class(inputs.detections)
    if set(ids) != set(ds.ids):
        raise ValueError(f"detections cover {len(ids)} images but {ds.name} has {len(ds)}; run detect again")
    gt = {}
    for image_id in ds.ids:
        g = ds.ground_truth(image_id)
        gt[image_id] = (g.boxes, g.labels, g.difficult)
    n_detections = {name: int(len(dets[name][1])) if name in dets else 0 for name in ds.classes}
    if params.metric == "coco":
        ap_doc, curves, title = _coco(gt, dets, ds, n_detections)
    else:
        ap_doc, curves, title = _voc(gt, dets, ds, params, n_detections)
    atomic_write_json(out.dir / "ap.json", ap_doc)
    if curves:
        plot_pr_curves(curves, out.dir / "pr_curves.png", title=title)
    table = format_ap_table({"detector": ap_doc["ap"]}, ds.classes)
    atomic_write_bytes(out.dir / "table.txt", (table + "\n").encode())
    metrics = {"mAP": ap_doc["mAP"], "ap": ap_doc["ap"], "metric": params.metric, "table": table}
    metrics.update({k: ap_doc[k] for k in ("AP50", "AP75") if k in ap_doc})
    return out.finish(metrics=metrics)


def _voc(gt, dets, ds, params, n_detections):
    from sppcli.data.voc_eval import evaluate

    result = evaluate(gt, dets, ds.classes, metric=params.metric, iou_threshold=params.iou)
    ap_doc = {"metric": params.metric, "mAP": json_number(result.mAP), "ap": {k: json_number(v) for k, v in result.ap.items()},
              "n_positives": {k: r.n_positives for k, r in result.per_class.items()},
              "n_detections": n_detections}
    curves = {k: (r.recall, r.precision, r.ap) for k, r in result.per_class.items() if r.n_positives > 0}
    return ap_doc, curves, f"{ds.name}: {params.metric} mAP {100 * result.mAP:.1f}"


def _coco(gt, dets, ds, n_detections):
    from sppcli.data.coco_eval import evaluate_coco

    result = evaluate_coco(gt, dets, ds.classes)
    ap_doc = {"metric": "coco", "mAP": json_number(result.mAP), "ap": {k: json_number(v) for k, v in result.ap.items()},
              "AP50": json_number(result.AP50), "AP75": json_number(result.AP75),
              "ap50": {k: json_number(v) for k, v in result.ap50.items()},
              "n_positives": result.n_positives, "n_detections": n_detections}
    # The curve AP50 averages: COCO's interpolated precision at each of its 101 recall thresholds.
    curves = {k: (result.recall_thresholds, result.precision50[k], result.ap50[k])
              for k in ds.classes if result.n_positives[k] > 0}
    title = f"{ds.name}: COCO mAP@[.5:.95] {100 * result.mAP:.1f}, AP50 {100 * result.AP50:.1f} (curves at IoU 0.5)"
    return ap_doc, curves, title


def format_result(manifest: Manifest) -> str:
    m = manifest.metrics
    mAP = m.get("mAP")
    head = f"{manifest.dataset}: {m.get('metric')} mAP = {_pct(mAP)}"
    if m.get("metric") == "coco":
        head += f" (mAP@[.5:.95]), AP50 = {_pct(m.get('AP50'))}, AP75 = {_pct(m.get('AP75'))}"
    return f"{head}\n{m.get('table', '')}\nPR curves: {manifest.path('pr_curves.png')}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"
