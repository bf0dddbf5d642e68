"""`sppcli report --html`: one self-contained page of a pipeline's results.

``report/index.html`` holds the Table 6 analog, the timings, the per-class AP table, the PR curves
of every evaluated row, the proposals' recall and a grid of drawn detections. Everything it shows
is copied or drawn into the report folder and linked relatively, with inline CSS and no script
or external asset, so the folder can be moved, zipped or opened from disk without a server.

Numbers come from the artifacts as they are (``ap.json``, the manifests' metrics): a cell's
``data-value`` attribute holds the exact value, its text the rounded one.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from urllib.parse import quote

from sppcli.artifacts import atomic_path, atomic_write_bytes
from sppcli.data.proposal_recall import RECALL_THRESHOLDS
from sppcli.data.voc_eval import VOC_SHORT_NAMES
from sppcli.pipeline import Planner
from sppcli.report.table6 import complete_manifest, scale_planners, table6, table6_rows

GRID_IMAGES = 12
THUMB_SIDE = 360  # px: sharp in a ~300 px grid cell, a few tens of KB each

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b;
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px;
     border-bottom: 1px solid #d5dae0; padding-bottom: 4px; }
.meta { color: #5a6470; margin: 0 0 8px; } nav a { margin-right: 14px; }
.note { color: #5a6470; font-size: 13px; margin: 6px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e7eb; text-align: right; white-space: nowrap; }
th { background: #f3f5f7; font-weight: 600; } th:first-child, td:first-child { text-align: left; }
td.missing { color: #8a939c; font-style: italic; } td.nopos { color: #a0a8b0; }
tr.best td { font-weight: 700; }
code { background: #f3f5f7; padding: 1px 4px; border-radius: 3px; font-size: 13px; white-space: nowrap; }
ul.note { margin: 0; padding-left: 22px; }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 16px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
figure { margin: 0; } figure img { width: 100%; height: auto; display: block; border: 1px solid #d5dae0; }
figcaption { font-size: 13px; color: #3b444e; margin-top: 3px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(text: str, value=None, cls: str = "", title: str = "") -> str:
    attrs = ""
    if value is not None:
        attrs += f' data-value="{_e(repr(float(value)))}"'
    if cls:
        attrs += f' class="{cls}"'
    if title:
        attrs += f' title="{_e(title)}"'
    return f"<td{attrs}>{_e(text)}</td>"


def _table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join(f"<tr{r[0]}>{''.join(r[1:])}</tr>" for r in rows)
    return (f'<div class="scroll"><table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody></table></div>")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _href(*parts: str) -> str:
    return "/".join(quote(p) for p in parts)


# --------------------------------------------------------------------------------------------- sections


def _table6_section(planner: Planner, rows, metric: str, others=()) -> str:
    """``rows``: the config's own column; ``others``: (heading, rows) of the other scale columns."""
    c = planner.config
    scales = ",".join(str(s) for s in c.features.scales)
    coco = metric == "coco"
    header = (["", f"SPP ({len(c.features.scales)}-sc: {scales}) mAP (%)"] + (["AP50 (%)", "AP75 (%)"] if coco else [])
              + [f"{label} mAP (%)" for label, _ in others])
    done = [r for r in rows if r.evaluate is not None]
    best = max((r.ap["mAP"] for r in done if r.ap["mAP"] is not None), default=None)
    body = []
    for r in rows:
        if r.evaluate is None:
            missing = [_cell("(not run)", cls="missing")] * (3 if coco else 1)
            body.append([f' id="row-{r.variant}"', _cell(r.label)] + missing + _other_cells(others, r.variant))
            continue
        ap = r.ap
        cells = [_cell(_pct(ap["mAP"]), ap["mAP"])]
        if coco:
            cells += [_cell(_pct(ap.get("AP50")), ap.get("AP50")), _cell(_pct(ap.get("AP75")), ap.get("AP75"))]
        cells += _other_cells(others, r.variant)
        mark = " best" if best is not None and ap["mAP"] == best and len(done) > 1 else ""
        body.append([f' id="row-{r.variant}" class="row{mark}"', _cell(r.label)] + cells)
    what = ("COCO mAP@[.5:.95] (pycocotools), with AP50 and AP75" if coco
            else f"{metric} AP at IoU {c.evaluate.iou}")
    note = (f'<p class="note">Detection mAP (%) on the test split, {_e(what)}. Rows as in the paper\'s '
            "Table 6: SVMs on pool5 / fc6 / fc7 features, without (fc) or with (ftfc) fine-tuning, "
            "and with bounding-box regression (bb).</p>")
    todo = [r for r in rows if r.evaluate is None]
    hint = ""
    if todo:
        config = f" --config {c.source}" if c.source != "<defaults>" else ""
        hint = ('\n<p class="note">Not run yet: train-svm, detect and evaluate with the same options, e.g.</p>'
                '\n<ul class="note">' + "".join(f"<li><code>{_e(r.command + config)}</code></li>" for r in todo)
                + "</ul>")
    return '<h2 id="table6">Table 6 analog</h2>\n' + note + _table("table6", header, body) + hint


def _other_cells(others, variant: str) -> list[str]:
    cells = []
    for _label, rows in others:
        row = next(r for r in rows if r.variant == variant)
        cells.append(_cell(_pct(row.ap["mAP"]), row.ap["mAP"]) if row.evaluate is not None
                     else _cell("(not run)", cls="missing"))
    return cells


def _timing_section(timing: dict) -> str:
    device = timing.get("device") or "?"
    names = {"conv": "conv (features, all scales)", "pool": "pool (SPP of the windows)",
             "fc": "fc (fc layers + SVMs)"}
    body = [["", _cell(names[n]), _cell(_num(timing.get(n)), timing.get(n))] for n in ("conv", "pool", "fc")]
    known = [timing[n] for n in ("conv", "pool", "fc") if timing.get(n) is not None]
    if len(known) == 3:
        body.append([' class="best"', _cell("total"), _cell(_num(sum(known)), sum(known))])
    note = (f'<p class="note">Seconds per test image on <code>{_e(device)}</code>, as the paper\'s Table 6 '
            "times them: conv from the features artifact; pool and fc the slowest evaluated row's "
            "detect artifact.</p>")
    return '<h2 id="timings">Timings</h2>\n' + note + _table("timings", ["stage", f"s / image ({device})"], body)


def _per_class_section(rows, classes) -> str:
    done = [r for r in rows if r.evaluate is not None]
    if not done:
        return '<h2 id="per-class">Per-class AP</h2>\n<p class="note">No row has been evaluated yet.</p>'
    header = ["method", "mAP (%)"] + [VOC_SHORT_NAMES.get(c, c) for c in classes]
    body = []
    for r in done:
        ap = r.ap
        positives = ap.get("n_positives", {})
        cells = [_cell(r.label), _cell(_pct(ap["mAP"]), ap["mAP"])]
        for name in classes:
            value = ap["ap"].get(name)
            nopos = positives.get(name, 1) == 0
            cells.append(_cell(_pct(value), value, cls="nopos" if nopos else "",
                               title=f"{name}: no positives in the test split; not in mAP" if nopos else name))
        body.append([f' id="ap-{r.variant}"'] + cells)
    note = ('<p class="note">AP (%) per class of every evaluated row (the paper\'s Table 7 layout); '
            "grey: the class has no positive in the test split and does not enter the mAP.</p>")
    return '<h2 id="per-class">Per-class AP</h2>\n' + note + _table("per-class", header, body)


def _curves_section(rows, out: Path) -> str:
    figures = []
    for r in rows:
        if r.evaluate is None or not r.evaluate.path("pr_curves.png").is_file():
            continue
        name = f"{r.variant}.png"
        atomic_write_bytes(out / "pr" / name, r.evaluate.path("pr_curves.png").read_bytes())
        href = _href("pr", name)
        figures.append(f'<figure id="pr-{r.variant}"><a href="{href}"><img src="{href}" alt="precision-recall '
                       f'curves of {_e(r.label)}"></a><figcaption>{_e(r.label)}: mAP {_pct(r.ap["mAP"])} '
                       f'({_e(r.ap["metric"])})</figcaption></figure>')
    if not figures:
        return '<h2 id="curves">Precision-recall curves</h2>\n<p class="note">No row has been evaluated yet.</p>'
    return ('<h2 id="curves">Precision-recall curves</h2>\n<div class="curves">\n' + "\n".join(figures)
            + "\n</div>")


def _proposals_section(planner: Planner) -> str:
    c = planner.config
    splits = list(dict.fromkeys([c.dataset.train_split, c.dataset.test_split]))
    manifests = {s: complete_manifest(planner, planner.plan("proposals", s)) for s in splits}
    header = ["split", "images", "windows / image", "ground truth"] + \
        [f"recall@{t} (%)" for t in RECALL_THRESHOLDS] + ["MABO", "s / image"]
    body = []
    for split, m in manifests.items():
        if m is None:
            body.append([f' id="proposals-{_e(split)}"', _cell(split),
                         _cell("(not run)", cls="missing")] + [_cell("")] * (len(header) - 2))
            continue
        x = m.metrics
        cells = [_cell(split), _cell(str(x["n_images"]), x["n_images"]),
                 _cell(_num(x.get("mean_boxes"), 1), x.get("mean_boxes")), _cell(str(x["n_gt"]), x["n_gt"])]
        cells += [_cell(_pct(x.get(f"recall@{t}")), x.get(f"recall@{t}")) for t in RECALL_THRESHOLDS]
        cells += [_cell(_num(x.get("mabo")), x.get("mabo")),
                  _cell(_num(x.get("seconds_per_image")), x.get("seconds_per_image"))]
        body.append([f' id="proposals-{_e(split)}"'] + cells)
    done = {s: m for s, m in manifests.items() if m is not None}
    text = ('<h2 id="proposals">Proposals</h2>\n<p class="note">How well the proposal windows cover the '
            "non-difficult ground truth (recall: share of objects with a window of IoU at least t; MABO: "
            "mean over classes of the mean best overlap).</p>\n" + _table("proposals", header, body))
    if done:
        classes = list(next(iter(done.values())).metrics.get("per_class", {}))
        header = ["class"] + [h for s in done for h in (f"{s} objects", f"{s} recall@0.5 (%)")]
        rows = []
        for name in classes:
            cells = [_cell(name)]
            for m in done.values():
                row = m.metrics["per_class"].get(name, {})
                cells += [_cell(str(row.get("n_gt", "-")), row.get("n_gt")),
                          _cell(_pct(row.get("recall")), row.get("recall"))]
            rows.append([""] + cells)
        text += "\n" + _table("proposals-per-class", header, rows)
    return text


def _grid_section(planner: Planner, rows, out: Path, score: float, limit: int) -> str:
    from PIL import Image

    from sppcli.stages.detect import draw_detections_of, read_detections

    shown = next((r for r in reversed(rows) if r.detect is not None), None)
    if shown is None:
        return '<h2 id="detections">Detections</h2>\n<p class="note">No detections yet.</p>'
    dataset = planner.dataset(planner.config.dataset.test_split)
    folder, thumbs = out / "detections", out / "detections" / "thumbs"
    written = draw_detections_of(shown.detect, dataset, folder, score, limit)
    dets = read_detections(shown.detect)
    counts = {image_id: int(((dets.image_index == i) & (dets.scores > score)).sum())
              for i, image_id in enumerate(dets.image_ids[:limit])}
    figures = []
    for path in written:
        image_id = path.stem
        with Image.open(path) as im:
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            with atomic_path(thumbs / f"{image_id}.jpg") as tmp:
                im.convert("RGB").save(tmp, format="JPEG", quality=88)
        figures.append(f'<figure id="det-{_e(image_id)}"><a href="{_href("detections", path.name)}">'
                       f'<img src="{_href("detections", "thumbs", image_id + ".jpg")}" alt="detections on '
                       f'{_e(image_id)}"></a><figcaption>{_e(image_id)}: {_plural(counts.get(image_id, 0), "detection")} '
                       f"above {score:g}</figcaption></figure>")
    note = (f'<p class="note">The first {len(written)} test images with the <b>{_e(shown.label)}</b> '
            f"row's detections scoring above {score:g} (each box: class and SVM score); click an image "
            "for the full-size PNG.</p>")
    return '<h2 id="detections">Detections</h2>\n' + note + '<div class="grid">\n' + "\n".join(figures) + "\n</div>"


# --------------------------------------------------------------------------------------------- page


def write_html_report(planner: Planner, out_dir: Path, score: float = 0.0, limit: int = GRID_IMAGES,
                      scale_columns=()) -> Path:
    """Write ``out_dir/index.html`` and the images it shows; returns the page's path.

    Args:
        planner: the pipeline (config and cache) to report on; nothing is computed or run.
        out_dir: the report folder (``<cache>/report`` from the CLI).
        score: detections above this score are drawn (the paper's Figure 6 draws those > 0).
        limit: how many test images the detection grid shows.
        scale_columns: other sets of ``features.scales`` whose Table 6 rows are shown beside the
            config's (the paper's 1-scale and 5-scale columns).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = planner.config
    test = planner.dataset(c.dataset.test_split)
    rows = table6_rows(planner)
    metric = c.evaluate.metric
    _text, data = table6(planner)
    others = [(label, table6_rows(p)) for label, p in scale_planners(planner, scale_columns)[1:]]
    sections = [
        _table6_section(planner, rows, metric, others),
        _timing_section(data["timing"]),
        _per_class_section(rows, list(test.classes)),
        _curves_section(rows, out),
        _proposals_section(planner),
        _grid_section(planner, rows, out, score, limit),
    ]
    nav = " ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in [
        ("table6", "Table 6"), ("timings", "Timings"), ("per-class", "Per-class AP"),
        ("curves", "PR curves"), ("proposals", "Proposals"), ("detections", "Detections")])
    meta = (f"config <code>{_e(c.source)}</code> · test set <code>{_e(test.name)}</code> "
            f"({len(test)} images, {len(test.classes)} classes) · metric <code>{_e(metric)}</code> · "
            f"cache <code>{_e(planner.store.root)}</code>")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>sppcli report: {_e(test.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>sppcli report: {_e(test.name)}</h1>\n<p class=\"meta\">{meta}</p>\n<nav>{nav}</nav>\n"
        + "\n".join(sections) + "\n</body>\n</html>\n")
    path = out / "index.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
