"""docs/ARCHITECTURE.md stays the house as built: its package table lists every package and top-level module of
actprm_ray/, each with exactly the packages it imports, and no import cycle exists between packages."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "actprm_ray"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


@functools.cache
def units() -> frozenset[str]:
    """Our packages and top-level modules, by the name a row of the table uses."""
    names = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return frozenset(names)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """unit -> our units it imports anywhere in its files (function-level imports count: they are real edges)."""
    graph: dict[str, set[str]] = {u: set() for u in units()}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if src == "__init__":
            continue
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
                if node.module == "actprm_ray":  # `from actprm_ray import select`
                    modules = [f"actprm_ray.{a.name}" for a in node.names]
            else:
                continue
            for m in modules:
                parts = m.split(".")
                if parts[0] == "actprm_ray" and len(parts) > 1 and parts[1] != src:
                    graph[src].add(parts[1])
    return graph


def documented() -> dict[str, set[str]]:
    """The package table: | `name` | holds | imports |."""
    text = DOC.read_text()
    section = text.split("## Packages", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([a-z_]+)`\s*\|[^|]*\|\s*([^|]*)\|\s*$", line)
        if m:
            deps = m.group(2).strip()
            rows[m.group(1)] = set() if deps in ("—", "-", "") else {d.strip() for d in deps.split(",")}
    return rows


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": set()}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_the_table_lists_every_package_once():
    doc = documented()
    assert set(doc) == units(), (f"docs/ARCHITECTURE.md misses {sorted(units() - set(doc))}, "
                                 f"lists gone {sorted(set(doc) - units())}")


@pytest.mark.parametrize("unit", sorted(units()))
def test_the_table_shows_what_each_package_imports(unit):
    assert documented().get(unit) == import_graph()[unit], (
        f"`{unit}` imports {sorted(import_graph()[unit])}; docs/ARCHITECTURE.md says {sorted(documented().get(unit, ()))}")


def test_no_import_cycle_between_packages():
    assert cycles(import_graph()) == []


def test_nothing_in_the_package_imports_the_drivers():
    importers = sorted(u for u, deps in import_graph().items() if "drivers" in deps)
    assert importers == [], f"{importers} import actprm_ray.drivers: only jobs/ should"
