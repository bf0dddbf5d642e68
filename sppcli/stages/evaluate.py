"""`sppcli evaluate`: PASCAL VOC evaluation of a detect artifact (per-class AP, mAP, PR curves)."""
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


def run(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    from sppcli.viz import plot_pr_curves
    from sppcli.data.voc_eval import evaluate, format_ap_table

    ds = inputs.dataset
    ids, dets = detections_by_class(inputs.detections)
    if set(ids) != set(ds.ids):
        raise ValueError(f"detections cover {len(ids)} images but {ds.name} has {len(ds)}; run detect again")
    gt = {}
    for image_id in ds.ids:
        g = ds.ground_truth(image_id)
        gt[image_id] = (g.boxes, g.labels, g.difficult)
    result = evaluate(gt, dets, ds.classes, metric=params.metric, iou_threshold=params.iou)
    ap_doc = {"metric": params.metric, "mAP": json_number(result.mAP), "ap": {k: json_number(v) for k, v in result.ap.items()},
              "n_positives": {k: r.n_positives for k, r in result.per_class.items()},
              "n_detections": {k: int(len(r.order)) for k, r in result.per_class.items()}}
    atomic_write_json(out.dir / "ap.json", ap_doc)
    curves = {k: (r.recall, r.precision, r.ap) for k, r in result.per_class.items() if r.n_positives > 0}
    if curves:
        plot_pr_curves(curves, out.dir / "pr_curves.png",
                       title=f"{ds.name}: {params.metric} mAP {100 * result.mAP:.1f}")
    table = format_ap_table({"detector": result.ap}, ds.classes)
    atomic_write_bytes(out.dir / "table.txt", (table + "\n").encode())
    return out.finish(metrics={"mAP": ap_doc["mAP"], "ap": ap_doc["ap"], "metric": params.metric,
                               "table": table})


def format_result(manifest: Manifest) -> str:
    m = manifest.metrics
    mAP = m.get("mAP")
    head = f"{manifest.dataset}: {m.get('metric')} mAP = {'n/a' if mAP is None else f'{100 * mAP:.1f}'}"
    return f"{head}\n{m.get('table', '')}\nPR curves: {manifest.path('pr_curves.png')}"
