"""Imports point down the pipeline and never in a circle (docs/architecture.md), lazy imports included.

The graph is read from the source with `ast`, so nothing is imported: every `import loraft.x`, `from loraft.x import
name` (name: a submodule where one exists), `from loraft import x` and relative import, at any nesting level (an
import inside a function is still an edge: it only moves the circle to run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).parents[1] / "src" / "loraft"


def module_name(path: Path) -> str:
    parts = ("loraft",) + path.relative_to(PACKAGE_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The loraft modules `name` (defined in `path`) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "loraft")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "loraft":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in known else source)
    return {target for target in found if target != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        targets = imported_modules(name, path, known)
        unknown = targets - known
        assert not unknown, f"{name} imports {sorted(unknown)}, which is no module of loraft"
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for group in groups:
        start = min(group)
        # the shortest way back to `start` inside the group, breadth first
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            following = []
            for node in frontier:
                for target in sorted(graph[node] & group):
                    if target == start:
                        cycle = paths[node] + [start]
                        break
                    if target not in paths:
                        paths[target] = paths[node] + [target]
                        following.append(target)
                if cycle:
                    break
            frontier = following
        cycles.append(cycle)
    return cycles


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert "loraft.files" in graph and "loraft.serve" in graph
    assert "loraft.config" in graph["loraft.rundir"]  # a top-level import
    assert "loraft.serve.app" in graph["loraft.serve"]  # a package's own imports
    assert "loraft.fastpaths.bloom" in graph["loraft.fastpaths"]  # an import inside a function


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_in_a_circle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_files_imports_nothing_from_loraft():
    assert import_graph()["loraft.files"] == set()
