"""`sppcli status`: the state of every stage of a pipeline, from its config."""
from __future__ import annotations

from sppcli.artifacts import verify as verify_run
from sppcli.pipeline import VARIANT_LABELS, VARIANTS, Planner


def _rows_for(planner: Planner, variants) -> list[tuple[str, str, str]]:
    """(stage, split, variant) in pipeline order; shared stages once, variant stages per variant."""
    c = planner.config
    train, test = c.dataset.train_split, c.dataset.test_split
    rows = [("proposals", train, ""), ("proposals", test, "")]
    if not c.features.weights:
        rows.append(("pretrain", train, ""))
    rows += [("features", train, ""), ("features", test, ""), ("pool", train, ""), ("pool", test, ""),
             ("finetune", train, ""), ("bbox_reg", train, "")]
    for v in variants:
        rows += [("svm", train, v), ("detect", test, v), ("evaluate", test, v)]
    return rows


def pipeline_status(planner: Planner, variants=None, hint_args: str = "", verify: bool = False) -> list[dict]:
    """One dict per stage run the config implies: stage, dataset, variant, state, reasons, items, size.

    ``hint_args``: the options the user gave (``--config``, ``--set``, ``--cache-dir``), appended
    to each "run this next" command so that running it computes the same key. ``verify``:
    re-hash every file of each complete run against its manifest; a run with a file that
    differs is ``damaged`` and its row lists those files under ``damaged_files``.
    """
    variants = list(variants or VARIANTS)
    out = []
    seen = set()
    for stage, split, variant in _rows_for(planner, variants):
        p = planner
        if variant:
            p = planner.with_overrides(VARIANTS[variant])
        try:
            plan = p.plan(stage, split)
        except (OSError, ValueError) as e:
            out.append({"stage": stage, "split": split, "variant": VARIANT_LABELS.get(variant, ""),
                        "state": "error", "reasons": [str(e)]})
            continue
        if (stage, plan.key) in seen:  # e.g. the bbox regressors are shared by all rows
            continue
        seen.add((stage, plan.key))
        st = p.state(plan)
        command = plan.command
        if variant and stage in ("svm", "detect", "evaluate"):
            command += f" --variant {variant}"
        state, reasons, damaged = st.state, list(st.reasons), []
        if verify and st.state == "complete" and st.manifest is not None:
            damaged = [str(path) for path in verify_run(st.manifest)]
            if damaged:
                state, reasons = "damaged", [f"{len(damaged)} damaged file{'s' * (len(damaged) > 1)}"]
        if state == "damaged":
            command += " --force"
        if hint_args:
            command += f" {hint_args}"
        elif p.config.source != "<defaults>":
            command += f" --config {p.config.source}"
        out.append({"stage": stage, "dataset": plan.dataset, "split": split,
                    "variant": VARIANT_LABELS.get(variant, ""), "key": plan.key[:12], "state": state,
                    "reasons": reasons, "damaged_files": damaged, "done_items": st.done_items, "total_items": st.total_items,
                    "size_bytes": st.size_bytes, "command": command})
    return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def format_status(rows: list[dict]) -> str:
    width = max([24] + [len(r.get("dataset", r["split"])) for r in rows])
    lines = [f"{'stage':<10} {'dataset':<{width}} {'variant':<9} {'state':<9} {'size':>9}  detail"]
    for r in rows:
        detail = "; ".join(r.get("reasons", []))
        if r["state"] == "complete" and r.get("total_items"):
            detail = f"{r['total_items']} images"
        if r["state"] in ("missing", "stale", "partial", "damaged") and r.get("command"):
            detail = f"{detail}  -> {r['command']}"
        lines.append(f"{r['stage']:<10} {r.get('dataset', r['split']):<{width}} {r.get('variant', ''):<9} "
                     f"{r['state']:<9} {_size(r.get('size_bytes', 0)):>9}  {detail}")
    for r in rows:
        for path in r.get("damaged_files", []):
            lines.append(f"damaged: {path}  -> {r['command']}")
    return "\n".join(lines)
