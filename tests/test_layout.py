"""The house keeps its layering: cli → jobs → shared, no upward import and no import cycle, not even
through an import inside a function; modules and functions stay short enough to read."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lmctk"

# Rank of each top-level part: a module may import only parts of a lower rank (or its own part).
RANKS = {
    "errors": 0, "seeding": 0, "__init__": 0,
    "io": 1,
    "metrics": 2, "recipes": 2, "render": 2, "tasks": 2, "models": 2,
    "spec": 3, "rundir": 3,
    "loading": 4,
    "train": 5,
    "basin": 6,
    "soup": 7, "dynamics": 7,
    "cli": 8, "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every lmctk module `name` imports, at module level or inside functions (TYPE_CHECKING included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lmctk"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("lmctk"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_has_a_rank():
    assert {_part(m) for m in MODULES} <= set(RANKS), "add the new part to RANKS (and to docs/ARCHITECTURE.md)"


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
              if _part(d) != _part(m) and RANKS[_part(d)] >= RANKS[_part(m)]]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), a package's own re-exports
    (`__init__` → its submodules) excluded: those run after the submodules and close no loop."""
    graph = {m: {d for d in deps if not (MODULES[m].name == "__init__.py" and d.startswith(m + "."))}
             for m, deps in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles() == []


def test_the_walker_sees_cycles_and_function_level_imports(tmp_path):
    """Negative control: the graph includes imports inside functions, and Tarjan finds a planted loop."""
    assert "lmctk.basin.align" in GRAPH["lmctk.basin.barrier"]
    GRAPH["lmctk.io.read"].add("lmctk.io.lazy")
    GRAPH["lmctk.io.lazy"].add("lmctk.io.read")
    try:
        assert any({"lmctk.io.read", "lmctk.io.lazy"} <= set(c) for c in _cycles())
    finally:
        GRAPH["lmctk.io.read"] = _imports("lmctk.io.read")
        GRAPH["lmctk.io.lazy"] = _imports("lmctk.io.lazy")


MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 50


def test_modules_are_short():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules (> {MAX_MODULE_LINES} lines): {long}"


def test_functions_are_short():
    """Bodies, not docstrings or signatures, count: a function is a screen of code at most."""
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                n = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert not long, f"split these functions (> {MAX_FUNCTION_LINES} lines of body): {long}"


def test_declared_python_floor_is_the_one_tested():
    """pyproject's requires-python names the oldest Python the suite runs on (CI runs this one)."""
    floor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert floor, "pyproject.toml: requires-python must be a '>=X.Y' floor"
    assert sys.version_info[:2] >= (int(floor[1]), int(floor[2]))
    if sys.version_info[:2] != (int(floor[1]), int(floor[2])):
        pytest.skip(f"this interpreter is newer than the declared floor {floor[1]}.{floor[2]}")
