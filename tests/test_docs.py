"""The documentation's numbers come from the benchmarks' JSON, and its links lead somewhere."""

from __future__ import annotations

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
