"""The documentation holds together: its links lead somewhere, the blocks that tools rewrite
or run are where the tools look, and the design notes that code and tests cite exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(heading) for heading in HEADING.findall(text)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_lead_to_files_and_headings_that_exist(page):
    text = FENCE.sub("", page.read_text())
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}: no such file"
        if fragment and linked.suffix == ".md":
            assert fragment in anchors_of(linked), f"{page.name} links to {target}: no heading"


def test_the_readme_holds_the_block_ci_runs():
    # .ci/run extracts the fenced block after this marker and runs it.
    readme = (ROOT / "README.md").read_text()
    marker = readme.index("<!-- ci:test-commands")
    block = readme[marker:].split("```")[1]
    assert "pytest" in block and "ruff check" in block


def test_the_benchmarks_page_holds_the_block_the_benchmark_rewrites():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    start = page.index("<!-- bench:results:start -->")
    assert start < page.index("<!-- bench:results:end -->")


def test_every_design_note_cited_exists():
    design = (ROOT / "docs" / "design.md").read_text()
    notes = design.split("## Design notes", 1)[1].split("\n## ", 1)[0]
    numbers = [int(n) for n in re.findall(r"^ ?(\d+)\. \*\*", notes, re.MULTILINE)]
    assert numbers == list(range(1, 13))
    cited = set()
    for folder in ("deployments", "tests", "bench"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            for match in re.finditer(r"design notes? ([\d, and]+)", text):
                cited.update(int(n) for n in re.findall(r"\d+", match.group(1)))
            cited.update(int(n) for n in re.findall(r"trap (\d+) of the design notes", text))
    assert cited and cited <= set(numbers), sorted(cited - set(numbers))


CITED_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)")
CONTINUED_TEST = re.compile(r"`::(\w+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_test_a_page_cites_exists(page):
    """A claim backed by a test names it; a renamed or deleted test must not leave the claim
    pointing at nothing. `::name` alone continues the file cited last."""
    text = page.read_text()
    cited_file = None
    for match in re.finditer(f"{CITED_TEST.pattern}|{CONTINUED_TEST.pattern}", text):
        path, name, continued = match.group(1), match.group(2), match.group(3)
        if path:
            cited_file = ROOT / path
        name = name or continued
        assert cited_file is not None and cited_file.exists(), f"{page.name}: {match.group(0)}"
        source = cited_file.read_text()
        defined = re.search(rf"^(async )?def {name}\(", source, re.MULTILINE)
        assert defined, f"{page.name} cites {cited_file.relative_to(ROOT)}::{name}: no such test"
