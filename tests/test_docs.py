"""The documentation's numbers come from the benchmarks' JSON, and its links lead somewhere."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import render_docs  # noqa: E402  benchmarks/render_docs.py


def test_measured_page_is_what_the_benchmarks_json_renders():
    assert (ROOT / "docs" / "measured.md").read_text() == render_docs.render(), \
        "docs/measured.md differs from docs/results/*.json: run python benchmarks/render_docs.py"


def test_readme_is_a_page_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_committed_study_table_is_recomputed_from_its_runs_metrics():
    """docs/study/ holds the default local study's table and, per run, the metrics.jsonl, config.json and
    report.json it was built from (python -m pipeline.reproduce, docs/reproduce.md)."""
    from pipeline import config
    from pipeline.study import design, table

    study = ROOT / "docs" / "study"
    runs = design.runs(design.ROWS, 2, config.preset("study"), [])
    built = table.build(study / "runs", runs)
    assert json.loads((study / "table1.json").read_text()) == built
    assert (study / "table1.md").read_text() == table.markdown(built)
    assert all(run["state"] == "finished" for row in built["rows"] for run in row["runs"])
