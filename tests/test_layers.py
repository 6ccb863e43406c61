"""The package's layers: every import of `sweep` code goes down the floors below, and no module imports itself back.

Floors, top first: the apps (`__main__`, `report`, `sync`, `copy`), run, views, store, measure, config, records. A
module may import its own floor and any floor beneath it. The package's own `__init__` (its version) is beneath them
all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sweep"
FLOORS = ("records", "config", "measure", "store", "views", "run", "apps")
APPS = ("__main__", "report", "sync", "copy")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] in APPS:
        return FLOORS.index("apps")
    return FLOORS.index(parts[1])


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, at any depth of its code (function-level imports count too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "bundled" not in p.parts]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if target == module.rpartition(".")[0]:
                continue  # a module reaching its own package's __init__ is how Python loads it, not a circle
            if state.get(target) == "open":
                return [*path[path.index(target):], target] if target in path else [*path, target]
            if target not in state and (found := visit(target, [*path, target])):
                return found
        state[module] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_import_graph_is_read_from_the_whole_package():
    graph = import_graph()
    assert {"sweep.run.job", "sweep.measure.timing", "sweep.config", "sweep.records.results"} <= graph.keys()
    assert "sweep.measure.timing" in graph["sweep.run.job"]  # imports inside the package are seen


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [f"{module} ({FLOORS[floor(module)]}) imports {target} ({FLOORS[floor(target)]})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if floor(target) > floor(module)]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_circle():
    assert cycle(import_graph()) is None, " -> ".join(cycle(import_graph()) or [])


def test_config_imports_nothing_of_the_package():
    assert import_graph()["sweep.config"] == set()


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_circle_finder_finds_circles_and_only_circles(graph, expected):
    assert cycle(graph) == expected
