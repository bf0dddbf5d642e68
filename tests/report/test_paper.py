"""`sppcli paper`: the paper's Tables 1, 2, 3, 4 and 9 on the tiny pipeline, every row measured."""
import json
import math

import pytest
from click.testing import CliRunner

from sppcli.artifacts import ArtifactStore
from sppcli.cli import main
from sppcli.report.paper import PLAIN_LEVELS, SPP4_LEVELS, SPP6_LEVELS, PaperRun, Table, paper_tables
from sppcli.pipeline import Planner
from tests.conftest import tiny_config, tiny_sets
from tests.stages.test_classify import _colour_folder

# No features.weights: every net is pretrained by the tables themselves (crops of the tiny devkit).
PAPER_SETS = ["classify.train_per_class=6", "classify.test_per_class=6", "classify.splits=3", "classify.size=64"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory, tiny_devkit):
    root = tmp_path_factory.mktemp("paper")
    folder = _colour_folder(root / "colours", per_class=12)
    planner = Planner(ArtifactStore(root / "cache"), tiny_config(tiny_devkit, None, *PAPER_SETS))
    run = PaperRun(planner, folder=folder)
    return run, {t.number: t for t in paper_tables(run)}


def _numbers(table: Table):
    return [c.ours for _label, cells in table.rows for c in cells if c.ours is not None]


def test_every_table_is_measured_beside_the_papers_numbers(paper):
    run, tables = paper
    assert sorted(tables) == ["1", "2", "3", "4", "9"]
    for table in tables.values():
        values = _numbers(table)
        assert values and all(0.0 <= v <= 100.0 for v in values if not math.isnan(v)), table.format()
        assert any(c.paper is not None for _label, cells in table.rows for c in cells)
        assert table.format().startswith(f"Table {table.number} analog")
    assert [label[:4] for label, _ in tables["1"].rows] == ["(e1)", "(e2)", "(e3)", "(e4)"]
    assert tables["1"].rows[0][1][0].paper == 35.99
    # Table 4: plain nets have no pyramid row; the rest carry a std over the random splits
    spp_pool5 = dict(tables["4"].rows)["SPP pool5"]
    assert spp_pool5[0].ours is None and spp_pool5[1].std is not None


def test_the_tables_ran_the_nets_they_name(paper):
    run, tables = paper
    pretrains = [m for m in run.done.values() if m.stage == "pretrain"]
    shapes = {(tuple(m.params["net"]["levels"]), tuple(m.params["pretrain"]["sizes"]), m.params["pretrain"]["seed"])
              for m in pretrains}
    sizes = tuple(run.planner.config.pretrain.sizes)
    single = (max(sizes),)
    assert shapes == {(PLAIN_LEVELS, single, 0), (SPP4_LEVELS, single, 0), (SPP6_LEVELS, single, 0),
                      (SPP6_LEVELS, sizes, 0), (SPP6_LEVELS, sizes, 1)}
    combined = [m for m in run.done.values() if m.stage == "detect" and m.params.get("combine")]
    assert len(combined) == 1 and len(combined[0].params["combine"]) == 1


def test_a_second_run_reads_everything_from_the_cache(paper, tiny_devkit, tmp_path):
    run, tables = paper
    again = PaperRun(Planner(run.planner.store, run.planner.config), folder=run.folder)
    import sppcli.pipeline as pipeline

    ran = []
    original = pipeline.execute

    def counting(planner, plan, work, force=False, log=None, **kw):
        manifest, did = original(planner, plan, work, force=force, log=log, **kw)
        ran.append(did)
        return manifest, did

    pipeline.execute = counting
    try:
        second = {t.number: t for t in paper_tables(again)}
    finally:
        pipeline.execute = original
    assert ran and not any(ran)
    assert {n: t.to_json() for n, t in second.items()} == {n: t.to_json() for n, t in tables.items()}


def test_cli_paper_writes_its_tables(paper, tiny_devkit):
    run, _tables = paper
    sets = [a for s in tiny_sets(tiny_devkit, None) + PAPER_SETS for a in ("--set", s)]
    cache = run.planner.store.root
    r = CliRunner().invoke(main, ["paper", "--tables", "1,9", "--cache-dir", str(cache), *sets])
    assert r.exit_code == 0, r.output
    assert "Table 1 analog" in r.output and "Table 9 analog" in r.output and "(35.99)" in r.output
    written = json.loads((cache / "paper" / "tables.json").read_text())
    assert [t["number"] for t in written] == ["1", "9"]
    bad = CliRunner().invoke(main, ["paper", "--tables", "5", "--cache-dir", str(cache), *sets])
    assert bad.exit_code == 1 and "unknown table" in bad.output
