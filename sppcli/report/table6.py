"""`sppcli report`: the paper's Table 6 (and Table 7's per-class layout) for one pipeline config.

The HTML page (`sppcli report --html`) is built from the same rows in :mod:`sppcli.report.html`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

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


def scale_planners(planner: Planner, scale_columns: Sequence[Sequence[int]] = ()) -> list[tuple[str, Planner]]:
    """The paper's Table 6 columns: the config's own scales, then each extra set of scales
    (``features.scales`` overridden, everything else as configured), with their headings."""
    out, seen = [], set()
    for scales in [tuple(planner.config.features.scales), *(tuple(int(v) for v in s) for s in scale_columns)]:
        if scales in seen:
            continue
        seen.add(scales)
        p = planner if scales == tuple(planner.config.features.scales) else \
            planner.with_overrides((f"features.scales=[{','.join(str(v) for v in scales)}]",))
        out.append((f"SPP ({len(scales)}-sc: {','.join(str(v) for v in scales)})", p))
    return out


def _column(planner: Planner) -> dict:
    """mAP, per-class AP and timings of one column (one set of scales)."""
    test = planner.config.dataset.test_split
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
    return {"mAP": rows, "ap": per_class, "timing": timing, "missing": missing}


def table6(planner: Planner, scale_columns: Sequence[Sequence[int]] = ()) -> tuple[str, dict]:
    """Text table and its data: mAP of every Table 6 row that has been evaluated, and timings,
    in one column per set of scales (the config's, then ``scale_columns``: the paper's 1-scale
    and 5-scale columns). The data's top-level keys describe the first column; ``columns`` all."""
    from sppcli.data.voc_eval import format_ap_table

    c = planner.config
    test = c.dataset.test_split
    columns = [dict(label=label, scales=list(p.config.features.scales), **_column(p))
               for label, p in scale_planners(planner, scale_columns)]
    width = max(22, *(len(col["label"]) + 2 for col in columns))
    n_images = len(planner.dataset(test))
    lines = [f"Table 6 analog: detection mAP (%) on {planner.dataset(test).name} ({n_images} images, "
             f"{c.evaluate.metric} AP)", f"{'':<22}" + "".join(f"{col['label']:<{width}}" for col in columns)]
    for label in VARIANT_LABELS.values():
        cells = (f"{100 * col['mAP'][label]:.1f}" if label in col["mAP"] else "(not run)" for col in columns)
        lines.append(f"{label:<22}" + "".join(f"{v:<{width}}" for v in cells))
    for name in ("conv", "pool", "fc"):
        device = columns[0]["timing"]["device"]
        cells = (col["timing"][name] for col in columns)
        lines.append(f"{name + ' time (' + device + ')':<22}"
                     + "".join(f"{'-' if v is None else f'{v:.3f}s':<{width}}" for v in cells))
    totals = []
    for col in columns:
        known = [col["timing"][n] for n in ("conv", "pool", "fc") if col["timing"][n] is not None]
        totals.append(f"{sum(known):.3f}s" if len(known) == 3 else "-")
    if any(t != "-" for t in totals):
        lines.append(f"{'total time':<22}" + "".join(f"{t:<{width}}" for t in totals))
    text = "\n".join(line.rstrip() for line in lines)
    first = columns[0]
    if first["ap"]:
        classes = list(planner.dataset(test).classes)
        text += "\n\nTable 7 analog: per-class AP (%)\n" + format_ap_table(first["ap"], classes)
    return text, {"mAP": first["mAP"], "ap": first["ap"], "timing": first["timing"], "missing": first["missing"],
                  "columns": columns}
