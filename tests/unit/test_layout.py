"""The layout keeps its promises: the ingress side and the generator side never import each
other (they meet only in the shared modules beside them), no module imports itself back
through others, the generator's parts never call up into its front, and every module is one
idea a newcomer can read in one sitting (the benchmarks included): not so long that it holds
several, not so short that it exists only to dodge a limit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "deployments"
BENCH = ROOT / "bench"
SIDES = ("ingress", "generator", "video")
# What each side may not import: the other sides, except that the video worker loads its
# model with the generator's model room (embedded models, devices, loading), never with the
# generator's front or its request machinery.
FORBIDDEN = {
    "ingress": ("deployments.generator", "deployments.video"),
    "generator": ("deployments.ingress", "deployments.video"),
    "video": (
        "deployments.ingress",
        "deployments.generator.engine",
        "deployments.generator.deployment",
        "deployments.generator.calls",
        "deployments.generator.loop",
        "deployments.generator.adapters",
        "deployments.generator.progress",
        "deployments.generator.safety",
        "deployments.generator.parallel",
    ),
}
MAX_MODULE_LINES = 600
MIN_MODULE_LINES = 30  # package faces (`__init__.py`) excepted
MAX_FUNCTION_LINES = 80
# The generator's front: admission, routing, streaming, health. Everything else in
# deployments/generator/ lives in a sub-package that never imports these.
GENERATOR_FRONT = ("deployments.generator.engine", "deployments.generator.deployment")
# The front's two modules and its face, and a sub-package a capability: model, calls, loop,
# adapters, progress, safety, parallel. A new capability is a room; past this, rooms should
# merge.
MAX_GENERATOR_ENTRIES = 10


def _imports(path: Path, runtime_only: bool = False) -> set[str]:
    """The modules `path` imports, in functions too. `runtime_only` leaves out the imports
    under `if TYPE_CHECKING:` (annotations only; they never run)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for child in ast.walk(node))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from deployments import generator` imports the package too.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _service_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _project_modules() -> list[Path]:
    """The service and its benchmarks (the tests are read a test at a time)."""
    return [ROOT / "serve_app.py", *_service_modules(), *sorted(BENCH.rglob("*.py"))]


@pytest.mark.parametrize("side", SIDES)
def test_a_side_never_imports_the_others(side):
    for module in sorted((PACKAGE / side).rglob("*.py")):
        crossing = {
            name
            for name in _imports(module)
            if any(name == other or name.startswith(other + ".") for other in FORBIDDEN[side])
        }
        assert not crossing, f"{module.relative_to(ROOT)} imports {sorted(crossing)}"


def test_the_shared_modules_import_no_side():
    for module in _service_modules():
        if module.relative_to(PACKAGE).parts[0] in SIDES:
            continue
        sided = {
            name
            for name in _imports(module)
            if any(name.split(".")[:2] == ["deployments", side] for side in SIDES)
        }
        assert not sided, f"{module.relative_to(ROOT)} imports {sorted(sided)}"


def test_the_generators_parts_never_import_its_front():
    """The front (engine, deployment) builds the parts and hands them what they report to;
    a part that imported it back would make the front's file the only way to read either."""
    for module in sorted((PACKAGE / "generator").rglob("*.py")):
        if _dotted(module) in GENERATOR_FRONT or module.parent == PACKAGE / "generator":
            continue
        upward = {name for name in _imports(module) if name.startswith(GENERATOR_FRONT)}
        assert not upward, f"{module.relative_to(ROOT)} imports {sorted(upward)}"


def _import_graph() -> dict[str, set[str]]:
    modules = {_dotted(path): path for path in [ROOT / "serve_app.py", *_service_modules()]}
    graph = {}
    for name, path in modules.items():
        imported = _imports(path, runtime_only=True)
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None (a depth-first search for a back edge)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_back_through_others():
    """A cycle makes the order of imports matter and hides which module is the lower one.
    Package faces count as modules: a face that imports its parts is fine, a part that
    imports its face back is a cycle."""
    cycle = _cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_generator_is_a_few_rooms():
    entries = [
        entry
        for entry in (PACKAGE / "generator").iterdir()
        if entry.name != "__pycache__" and (entry.suffix == ".py" or entry.is_dir())
    ]
    names = sorted(entry.name for entry in entries)
    assert len(entries) <= MAX_GENERATOR_ENTRIES, names


def test_no_module_is_too_long_to_read():
    for module in _project_modules():
        lines = len(module.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{module.relative_to(ROOT)} has {lines} lines"


def test_no_module_is_a_fragment():
    """A module of a few lines is a part of another idea, split off; it belongs back with it."""
    for module in _service_modules():
        if module.name == "__init__.py":
            continue
        lines = len(module.read_text().splitlines())
        assert lines >= MIN_MODULE_LINES, f"{module.relative_to(ROOT)} has {lines} lines"


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
    for module in _service_modules():
        if module.name in ("__init__.py", "deployment.py"):
            continue
        first = seen.setdefault(module.name, module)
        assert first == module, f"{first.relative_to(ROOT)} and {module.relative_to(ROOT)}"


@pytest.mark.parametrize(
    "module", ["deployments.ingress.deployment", "deployments.config.app_config"]
)
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
