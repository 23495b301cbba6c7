"""The layout keeps its promises: the ingress side and the generator side never import each
other (they meet only in the shared modules beside them), and no module or function grows
past what a newcomer can read in one sitting (the benchmarks included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "deployments"
BENCH = ROOT / "bench"
SIDES = ("ingress", "generator")
MAX_MODULE_LINES = 360
MAX_FUNCTION_LINES = 80


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from deployments import generator` imports the package too.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.py"))


@pytest.mark.parametrize("side", SIDES)
def test_a_side_never_imports_the_other(side):
    other = next(name for name in SIDES if name != side)
    for module in _modules(PACKAGE / side):
        crossing = {name for name in _imports(module) if name.startswith(f"deployments.{other}")}
        assert not crossing, f"{module.relative_to(ROOT)} imports {sorted(crossing)}"


def test_the_shared_modules_import_neither_side():
    for module in _modules(PACKAGE):
        sided = {
            name
            for name in _imports(module)
            if any(name.startswith(f"deployments.{side}") for side in SIDES)
        }
        assert not sided, f"{module.relative_to(ROOT)} imports {sorted(sided)}"


def _project_modules() -> list[Path]:
    """The service and its benchmarks (the tests are read a test at a time)."""
    return [ROOT / "serve_app.py", *sorted(PACKAGE.rglob("*.py")), *sorted(BENCH.rglob("*.py"))]


def test_no_module_is_too_long_to_read():
    for module in _project_modules():
        lines = len(module.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{module.relative_to(ROOT)} has {lines} lines"


def test_no_function_is_too_long_to_read():
    for module in _project_modules():
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                where = f"{module.relative_to(ROOT)}:{node.lineno} {node.name}"
                assert length <= MAX_FUNCTION_LINES, f"{where} has {length} lines"


def test_no_two_modules_share_a_name():
    """A path says what it holds: two `cache.py` (a directory, hooks) read as one thing. Only
    each side's `deployment.py` (its Serve deployment class) repeats, as a role."""
    seen: dict[str, Path] = {}
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name in ("__init__.py", "deployment.py"):
            continue
        first = seen.setdefault(module.name, module)
        assert first == module, f"{first.relative_to(ROOT)} and {module.relative_to(ROOT)}"


@pytest.mark.parametrize("module", ["deployments.ingress.deployment", "deployments.config"])
def test_the_ingress_side_imports_no_torch(module):
    """The ingress runs on CPU nodes with no model: importing torch and diffusers there cost
    ~3,000 modules and seconds of start-up for nothing."""
    code = (
        f"import sys, {module}\n"
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
        "print(','.join(heavy))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert found == "", f"importing {module} imports {found}"
