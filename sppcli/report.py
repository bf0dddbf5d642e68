"""`sppcli report`: the paper's Table 6 (and Table 7's per-class layout) for one pipeline config."""
from __future__ import annotations

import json

from sppcli.pipeline import VARIANT_LABELS, VARIANTS, Planner


def _complete(planner: Planner, plan):
    m = planner.store.manifest(plan.stage, plan.dataset, plan.key)
    return m if m is not None and m.complete else None


def table6(planner: Planner) -> tuple[str, dict]:
    """Text table and its data: mAP of every Table 6 row that has been evaluated, and timings."""
    from sppcli.data.voc_eval import format_ap_table

    c = planner.config
    test = c.dataset.test_split
    scales = ",".join(str(s) for s in c.features.scales)
    column = f"SPP ({len(c.features.scales)}-sc: {scales})"
    rows, per_class, missing = {}, {}, []
    detect_times, pool_times = [], []
    for variant, overrides in VARIANTS.items():
        p = planner.with_overrides(overrides)
        ev = _complete(p, p.plan("evaluate", test))
        label = VARIANT_LABELS[variant]
        if ev is None:
            missing.append(label)
            continue
        ap = json.loads((ev.dir / "ap.json").read_text())
        rows[label] = ap["mAP"]
        per_class[label] = ap["ap"]
        det = _complete(p, p.plan("detect", test))
        if det is not None:
            detect_times.append(det.metrics.get("fc_seconds_per_image", float("nan")))
            pool_times.append(det.metrics.get("pool_seconds_per_image", float("nan")))
    features = _complete(planner, planner.plan("features", test))
    timing = {
        "device": (features.environment.get("device") if features else None) or "?",
        "conv": features.metrics.get("conv_seconds_per_image") if features else None,
        # Windows are pooled where they are used: detection's pooling time is the test-time cost.
        "pool": max(pool_times) if pool_times else None,
        "fc": max(detect_times) if detect_times else None,
    }
    n_images = len(planner.dataset(test))
    lines = [f"Table 6 analog: detection mAP (%) on {planner.dataset(test).name} ({n_images} images, "
             f"{c.evaluate.metric} AP)", f"{'':<22}{column}"]
    for label in VARIANT_LABELS.values():
        value = f"{100 * rows[label]:.1f}" if label in rows else "(not run)"
        lines.append(f"{label:<22}{value}")
    for name in ("conv", "pool", "fc"):
        v = timing[name]
        lines.append(f"{name + ' time (' + timing['device'] + ')':<22}{'-' if v is None else f'{v:.3f}s'}")
    known = [timing[n] for n in ("conv", "pool", "fc") if timing[n] is not None]
    if len(known) == 3:
        lines.append(f"{'total time':<22}{sum(known):.3f}s")
    text = "\n".join(lines)
    if per_class:
        classes = list(planner.dataset(test).classes)
        text += "\n\nTable 7 analog: per-class AP (%)\n" + format_ap_table(per_class, classes)
    return text, {"mAP": rows, "ap": per_class, "timing": timing, "missing": missing}
