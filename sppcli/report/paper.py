"""The paper's comparisons beyond Table 6, run on a pipeline's own data (`sppcli paper`, `make paper`).

Each table is a set of configurations - overrides of the pipeline file, exactly as ``--set`` would
give them - whose stages run through the same planner and cache as every command (so a second
`make paper`, or one after Ctrl-C, only does what is left). Every number is printed beside the
paper's for the same row:

* Tables 1 and 2 (ImageNet top-1 error): nets pretrained on the pipeline's pretraining set with no
  pyramid (one 6 x 6 level: the "plain net", whose pool5 is the fixed 6 x 6 grid), SPP-net4
  ({4,3,2,1}) and SPP-net6 ({6,3,2,1}), single-size (the largest of ``pretrain.sizes``) and
  multi-size (all of them); tested with 10 views, one centre crop and the full image;
* Table 3 (VOC classification mAP): `classify` with the plain net's and the SPP-net's features, on
  the centre crop and the full image, at ``classify.size`` and at 392/224 of it;
* Table 4 (Caltech101's protocol): the same on a folder-per-class set that pretraining never saw,
  with the whole pyramid ("SPP pool5") as a row;
* Table 9 (model combination): a second SPP-net pretrained from another seed, its own whole
  detector (ftfc7 bb), and `detect --combine` of the two.

The paper's conv4 / conv5 rows of Tables 3 and 4 and Table 1's (e5) (8 crops + 2 full views) have
no analog here; the plain net is the SPP-net's trunk with one pooling level rather than the
ZF net's 3 x 3 / 2 max-pooling (at the training size the two give the same 6 x 6 grid of cells).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sppcli.artifacts import Manifest
from sppcli.pipeline import VARIANTS, Plan, Planner, RunOptions, run_stage

log = logging.getLogger(__name__)

PLAIN_LEVELS = (6,)
SPP4_LEVELS = (4, 3, 2, 1)
SPP6_LEVELS = (6, 3, 2, 1)
SEED_OF_SECOND_NET = 1


@dataclasses.dataclass(frozen=True)
class Cell:
    """One number of a table: ours (None when not measured) beside the paper's (None: no analog)."""

    ours: float | None
    paper: float | None
    std: float | None = None


@dataclasses.dataclass(frozen=True)
class Table:
    number: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[Cell, ...]], ...]
    note: str = ""

    def format(self) -> str:
        """The table as text: each cell ``ours (paper's)``; ``-`` where a row has no analog."""
        texts = [[_format_cell(c) for c in cells] for _label, cells in self.rows]
        width = max(len(label) for label, _ in self.rows) + 2
        cell_width = 2 + max([len(c) for c in self.columns] + [len(t) for row in texts for t in row])
        lines = [f"Table {self.number} analog: {self.title}; ours (the paper's)",
                 " " * width + "".join(c.rjust(cell_width) for c in self.columns)]
        for (label, _cells), row in zip(self.rows, texts):
            lines.append(label.ljust(width) + "".join(t.rjust(cell_width) for t in row))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"number": self.number, "title": self.title, "columns": list(self.columns), "note": self.note,
                "rows": [{"label": label, "cells": [dataclasses.asdict(c) for c in cells]}
                         for label, cells in self.rows]}


def _format_cell(cell: Cell) -> str:
    if cell.ours is None and cell.paper is None:
        return "-"
    ours = "-" if cell.ours is None or math.isnan(cell.ours) else f"{cell.ours:.1f}"
    if cell.std is not None:
        ours += f"+-{cell.std:.1f}"
    paper = "" if cell.paper is None else f" ({cell.paper:.2f})"
    return ours + paper


# ---------------------------------------------------------------------------------------------
# running what a table needs


def run_with_upstream(planner: Planner, plan: Plan, options: RunOptions, done: dict[str, Manifest]) -> Manifest:
    """Run ``plan`` after every stage it reads (each skipped when up to date); memoised by key."""
    if plan.key in done:
        return done[plan.key]
    for up in plan.upstream.values():
        run_with_upstream(planner, up, options, done)
    manifest, _ran = run_stage(planner, f"sppcli.stages.{plan.stage}", plan, options)
    done[plan.key] = manifest
    return manifest


@dataclasses.dataclass
class PaperRun:
    """The pipeline the tables are built from, and how to run their stages."""

    planner: Planner
    options: RunOptions = RunOptions()
    folder: Path | None = None  # Table 4's folder-per-class set
    done: dict[str, Manifest] = dataclasses.field(default_factory=dict)

    def variant(self, *overrides: str) -> Planner:
        return self.planner.with_overrides(list(overrides))

    def run(self, planner: Planner, stage: str, split: str | None = None) -> Manifest:
        return run_with_upstream(planner, planner.plan(stage, split), self.options, self.done)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.planner.config.pretrain.sizes)

    def net(self, levels: Sequence[int], multi_size: bool, *extra: str) -> Planner:
        sizes = list(self.sizes) if multi_size else [max(self.sizes)]
        return self.variant(f"net.levels={list(levels)}", f"pretrain.sizes={sizes}", *extra)


def _percent(value) -> float | None:
    return None if value is None else 100.0 * float(value)


# ---------------------------------------------------------------------------------------------
# the tables


def table1(paper: PaperRun) -> Table:
    nets = [("(e1) no SPP (plain net), single-size", PLAIN_LEVELS, False, 35.99),
            ("(e2) SPP-net4, single-size", SPP4_LEVELS, False, 35.06),
            ("(e3) SPP-net6, single-size", SPP6_LEVELS, False, 34.98),
            ("(e4) SPP-net6, multi-size", SPP6_LEVELS, True, 34.60)]
    rows = []
    for label, levels, multi, published in nets:
        errors = paper.run(paper.net(levels, multi), "pretrain").metrics["eval_table"]["top1_error"]
        rows.append((label, (Cell(_percent(errors["10 views"]), published),)))
    return Table("1", "held-out top-1 error (%) of the pretraining set, 10 views", ("10 views",), tuple(rows),
                 note=f"single-size = {max(paper.sizes)}, multi-size = {list(paper.sizes)} (the paper: 224; 224 and 180)")


def table2(paper: PaperRun) -> Table:
    published = {False: (38.01, 37.55), True: (37.57, 37.07)}
    rows = []
    for multi in (False, True):
        errors = paper.run(paper.net(SPP6_LEVELS, multi), "pretrain").metrics["eval_table"]["top1_error"]
        rows.append((f"SPP-net6, {'multi' if multi else 'single'}-size trained",
                     (Cell(_percent(errors["1 centre crop"]), published[multi][0]),
                      Cell(_percent(errors["1 full image"]), published[multi][1]))))
    return Table("2", "held-out top-1 error (%), a single view", ("1 crop", "1 full"), tuple(rows))


def _classify(paper: PaperRun, net: Planner, layer: str, view: str, size: int, folder: Path | None = None):
    overrides = [f"classify.layer={json.dumps(layer)}", f"classify.view={json.dumps(view)}", f"classify.size={size}"]
    if folder is not None:
        overrides.append(f"classify.folder={json.dumps(str(folder))}")
    planner = net.with_overrides(overrides)
    return paper.run(planner, "classify").metrics


def table3(paper: PaperRun) -> Table:
    size = int(paper.planner.config.classify.size)
    large = int(round(size * 392 / 224))
    plain, spp = paper.net(PLAIN_LEVELS, False), paper.net(SPP6_LEVELS, True)
    columns = [("(a) plain, crop", plain, "crop", size), ("(b) SPP, crop", spp, "crop", size),
               ("(c) SPP, full", spp, "full", size), (f"(d) SPP, full {large}", spp, "full", large)]
    published = {"pool5 (6x6)": (69.14, 68.76, 70.82, 71.67), "fc6": (74.86, 75.55, 77.32, 78.78),
                 "fc7": (75.90, 76.45, 78.39, 80.10)}
    layers = {"pool5 (6x6)": "pool5_6x6", "fc6": "fc6", "fc7": "fc7"}
    rows = []
    for label, layer in layers.items():
        cells = [Cell(_percent(_classify(paper, net, layer, view, s)["mAP"]), published[label][i])
                 for i, (_, net, view, s) in enumerate(columns)]
        rows.append((label, tuple(cells)))
    return Table("3", f"full-image classification mAP (%) on the test split, size {size} (the paper: 224)",
                 tuple(c[0] for c in columns), tuple(rows),
                 note="nets of Table 1 (e1) and (e4); the plain net's pool5 is its only level")


def table4(paper: PaperRun) -> Table | None:
    if paper.folder is None:
        return None
    size = int(paper.planner.config.classify.size)
    plain, spp = paper.net(PLAIN_LEVELS, False), paper.net(SPP6_LEVELS, True)
    columns = [("(a) plain, crop", plain, "crop"), ("(b) SPP, crop", spp, "crop"), ("(c) SPP, full", spp, "full")]
    published = {"pool5 (6x6)": (87.98, 87.60, 89.46), "SPP pool5": (None, 89.47, 91.44),
                 "fc6": (87.86, 88.54, 89.50), "fc7": (85.30, 86.10, 87.08)}
    layers = {"pool5 (6x6)": "pool5_6x6", "SPP pool5": "pool5", "fc6": "fc6", "fc7": "fc7"}
    rows = []
    for label, layer in layers.items():
        cells = []
        for i, (_, net, view) in enumerate(columns):
            if net is plain and layer == "pool5":
                cells.append(Cell(None, None))  # the plain net has no pyramid
                continue
            m = _classify(paper, net, layer, view, size, paper.folder)
            cells.append(Cell(_percent(m["accuracy_mean"]), published[label][i], _percent(m["accuracy_std"])))
        rows.append((label, tuple(cells)))
    first = _classify(paper, spp, "fc7", "full", size, paper.folder)
    return Table("4", f"mean class accuracy (%) +- std over random splits, {paper.folder.name} "
                      f"({len(first['classes'])} classes, size {size})",
                 tuple(c[0] for c in columns), tuple(rows))


def table9(paper: PaperRun) -> Table:
    first = paper.planner.with_overrides(list(VARIANTS["ftfc7bb"]))
    second = first.with_overrides([f"pretrain.seed={SEED_OF_SECOND_NET}"])
    test = paper.planner.config.dataset.test_split
    one = paper.run(first, "evaluate", test)
    two = paper.run(second, "evaluate", test)
    first_detect = paper.run(first, "detect", test)
    combined = paper.run(second.with_overrides([f"detect.combine={json.dumps([str(first_detect.dir)])}"]), "evaluate", test)
    rows = (("SPP-net (1)", (Cell(_percent(one.metrics["mAP"]), 59.2),)),
            ("SPP-net (2)", (Cell(_percent(two.metrics["mAP"]), 59.1),)),
            ("combination", (Cell(_percent(combined.metrics["mAP"]), 60.9),)))
    return Table("9", "detection mAP (%) of two nets (pretrained from seeds "
                      f"{paper.planner.config.pretrain.seed} and {SEED_OF_SECOND_NET}) and their combination, ftfc7 bb",
                 ("mAP",), rows)


TABLES: dict[str, Callable[[PaperRun], Table | None]] = {
    "1": table1, "2": table2, "3": table3, "4": table4, "9": table9}


def paper_tables(paper: PaperRun, numbers: Iterable[str] = tuple(TABLES)) -> list[Table]:
    """The tables named by ``numbers`` (each computed, or read from the cache when up to date)."""
    unknown = [n for n in numbers if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    tables = []
    for number in numbers:
        log.info("paper: Table %s", number)
        table = TABLES[number](paper)
        if table is None:
            log.warning("paper: Table %s needs a folder-per-class set (--folder); skipped", number)
            continue
        tables.append(table)
    return tables
