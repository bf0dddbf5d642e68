"""`sppcli report --html` before anything has run: the page still builds and says what is missing.
(The page of a complete run is checked in tests/test_pipeline_e2e.py, beside the run itself.)"""
from sppcli.artifacts import ArtifactStore
from sppcli.pipeline import VARIANTS, Planner
from sppcli.report.html import write_html_report
from tests.conftest import tiny_config


def test_a_report_of_an_empty_cache_lists_every_row_as_not_run(tmp_path, tiny_devkit):
    planner = Planner(ArtifactStore(tmp_path / "cache"), tiny_config(tiny_devkit))
    page = write_html_report(planner, tmp_path / "report").read_text()
    assert page.count("(not run)") == len(VARIANTS) + 2  # the Table 6 rows and both proposal splits
    for variant in VARIANTS:
        assert f"--variant {variant}" in page
    assert "No detections yet" in page and "<img" not in page
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["index.html"]
