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


def _module_map() -> str:
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Module map", 1)[1]
    return section.split("```", 2)[1]


def _mapped_paths(block: str) -> set[str]:
    """The paths the module map's tree names: an entry is a name ending in `/` or `.py` at
    the line's start (after its indent); other lines continue a description."""
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder) of the folders above
    for line in block.splitlines():
        stripped = line.lstrip(" ")
        name = stripped.split(" ", 1)[0]
        if not name.endswith(("/", ".py")):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(folder for _, folder in stack) + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def test_the_module_map_lists_every_module_and_nothing_else():
    mapped = {path for path in _mapped_paths(_module_map()) if path.split("/")[0] == "deployments"}
    actual = set()
    for module in (ROOT / "deployments").rglob("*.py"):
        relative = module.relative_to(ROOT)
        if module.name == "__init__.py":
            actual.add(str(relative.parent))  # a package: its folder is listed
        else:
            actual.add(str(relative))
    actual.add("deployments/ingress/playground")
    assert sorted(actual - mapped) == [], "modules missing from docs/design.md's module map"
    assert sorted(mapped - actual) == [], "module map entries with no module"


def test_the_module_map_parser_reads_nesting():
    block = "a/\n  b.py  x\n  c/\n    d.py  y\n        continued text\n  e.py\nf.py\n"
    assert _mapped_paths(block) == {"a", "a/b.py", "a/c", "a/c/d.py", "a/e.py", "f.py"}


def _tables(page: Path) -> list[list[str]]:
    """Each table of `page` (outside code blocks) as its lines, plus the line after it."""
    lines = FENCE.sub("", page.read_text()).splitlines()
    tables, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append([*current, line])
            current = []
    return tables


def _cells(row: str) -> int:
    return len(re.sub(r"\\\|", "", row.strip()).strip("|").split("|"))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_table_renders(page):
    """A table ends at a blank line (text right after one is read as another row), and
    every row has its header's cells (a longer row runs into the next paragraph)."""
    for table in _tables(page):
        *rows, after = table
        assert after.strip() == "", f"{page.name}: no blank line after the table at {rows[0]!r}"
        header = _cells(rows[0])
        for row in rows[2:]:
            assert _cells(row) == header, f"{page.name}: {row!r} has not {header} cells"
