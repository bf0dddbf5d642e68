"""`sppcli report`: the paper's Table 6 (and Table 7's per-class layout) for one pipeline config.

The HTML page (`sppcli report --html`) is built from the same rows in :mod:`sppcli.report.html`.
"""
from __future__ import annotations

import dataclasses
import json

from sppcli.artifacts import Manifest
from sppcli.pipeline import VARIANT_LABELS, VARIANTS, Planner


def complete_manifest(planner: Planner, plan):
    m = planner.store.manifest(plan.stage, plan.dataset, plan.key)
    return m if m is not None and m.complete else None


@dataclasses.dataclass(frozen=True)
class Row:
    """One Table 6 row: its artifacts when complete, else None, and the command that makes it."""

    variant: str
    label: str
    evaluate: Manifest | None
    detect: Manifest | None
    command: str

    @property
    def ap(self) -> dict | None:
        """The row's ap.json, or None before it is evaluated."""
        return json.loads(self.evaluate.path("ap.json").read_text()) if self.evaluate else None


def table6_rows(planner: Planner) -> list[Row]:
    """Every Table 6 row of the config, in the paper's order, evaluated or not."""
    test = planner.config.dataset.test_split
    rows = []
    for variant, overrides in VARIANTS.items():
        p = planner.with_overrides(overrides)
        plan = p.plan("evaluate", test)
        rows.append(Row(variant=variant, label=VARIANT_LABELS[variant], evaluate=complete_manifest(p, plan),
                        detect=complete_manifest(p, p.plan("detect", test)),
                        command=f"{plan.command} --variant {variant}"))
    return rows


def table6(planner: Planner) -> tuple[str, dict]:
    """Text table and its data: mAP of every Table 6 row that has been evaluated, and timings."""
    from sppcli.data.voc_eval import format_ap_table

    c = planner.config
    test = c.dataset.test_split
    scales = ",".join(str(s) for s in c.features.scales)
    column = f"SPP ({len(c.features.scales)}-sc: {scales})"
    rows, per_class, missing = {}, {}, []
    detect_times, pool_times = [], []
    for row in table6_rows(planner):
        if row.evaluate is None:
            missing.append(row.label)
            continue
        ap = row.ap
        rows[row.label] = ap["mAP"]
        per_class[row.label] = ap["ap"]
        if row.detect is not None:
            detect_times.append(row.detect.metrics.get("fc_seconds_per_image", float("nan")))
            pool_times.append(row.detect.metrics.get("pool_seconds_per_image", float("nan")))
    features = complete_manifest(planner, planner.plan("features", test))
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
