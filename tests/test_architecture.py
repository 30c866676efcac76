"""The shape of the codebase: which parts of unpoison may import which."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import unpoison

PACKAGE = Path(unpoison.__file__).resolve().parent


def _part(module: str) -> str | None:
    """unpoison.detect.fct -> 'detect', unpoison.run -> 'run'; the root package -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "unpoison" and parts[1] != "__version__" else None


def _imports(path: Path) -> set[str]:
    """Every unpoison module `path` imports, at the top or inside a function (a lazy
    import is still a dependency)."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = list(relative[:-1]) if relative[-1] != "__init__" else list(relative[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if module == "unpoison")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("unpoison.")}


def part_graph() -> dict[str, set[str]]:
    """Edges between the parts of unpoison (sub-packages and top-level modules)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for module in _imports(path):
            target = _part(module)
            if source and target and target != source:
                graph[source].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = part_graph()
    assert "context" in graph["detect"]          # `from ..context import ...` at the top of a module
    assert "session" in graph["commands"]        # `from ..session import ...` inside a function


def test_no_import_cycle_between_packages():
    assert cycles(part_graph()) == []


def test_detectors_and_defences_share_the_context_below_them():
    graph = part_graph()
    assert "defenses" not in graph["detect"]
    assert not {"detect", "defenses", "attacks"} & graph["context"]


def test_old_import_paths_still_work():
    from unpoison import context
    from unpoison.defenses import DefenseContext, StageTimer
    from unpoison.defenses.none import train_standard

    assert DefenseContext is context.DefenseContext and StageTimer is context.StageTimer
    assert train_standard is context.train_standard


def test_no_module_is_longer_than_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 400} == {}


def test_figures_never_touch_pyplot_global_state():
    users = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if any(m == "matplotlib.pyplot" or m.startswith("matplotlib.pyplot.") for m in _all_imports(p))]
    assert users == []


def _all_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found
