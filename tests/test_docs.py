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


def test_the_committed_study_tables_are_recomputed_from_their_runs_metrics_and_fill_the_pages():
    """docs/study/epochs<E>/ holds each budget's table and, per run, the metrics.jsonl, config.json and report.json
    it was built from (python -m pipeline.reproduce, docs/reproduce.md); the tables in the README and
    docs/reproduce.md are the ones those give (python benchmarks/render_docs.py writes them)."""
    from pipeline.study import table

    budgets = render_docs.committed_budgets()
    assert 6 in budgets and 18 in budgets
    for epochs in budgets:
        folder = ROOT / "docs" / "study" / f"epochs{epochs}"
        built = table.build(folder / "runs", render_docs.study_runs(epochs))
        assert json.loads((folder / "table1.json").read_text()) == built
        assert (folder / "table1.md").read_text() == table.markdown(built)
        assert built["epochs"] == epochs
    for page in render_docs.STUDY_PAGES:
        text = page.read_text()
        assert render_docs.TABLE_BLOCK.search(text), f"{page.name} shows no study table"
        assert render_docs.render_study_page(text) == text, f"{page.name}: run python benchmarks/render_docs.py"
