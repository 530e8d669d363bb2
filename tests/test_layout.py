"""The package's structure, read from its own imports: no cycle between modules or between folders, and an import
inside a function only where it defers a heavy or optional dependency, saying so."""

import ast
from collections import defaultdict
from pathlib import Path

import hyimage

PACKAGE = Path(hyimage.__file__).resolve().parent
MAX_DEFERRED = 20


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The package modules an import statement names (`from a.b import c` names a.b.c when that is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                 for alias in node.names]
    else:
        return []
    return [name for name in names if name.split(".")[0] == "hyimage" and name in known]


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Module -> the package modules it imports at module level; and every import inside a function."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    inner: list[tuple[str, int, str]] = []
    for name, path in known.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inside in ast.walk(node):
                    if isinstance(inside, (ast.Import, ast.ImportFrom)):
                        inner.append((name, inside.lineno, lines[inside.lineno - 1]))
        for node in ast.walk(tree):
            for target in imported(node, known):
                if target != name and not name.startswith(target + "."):  # a package's own __init__ is no edge
                    edges[name].add(target)
    inner_lines = {(n, line) for n, line, _ in inner}
    for name, path in known.items():  # module-level edges only: drop those made inside functions
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and (name, node.lineno) in inner_lines:
                for target in imported(node, known):
                    edges[name].discard(target)
    return edges, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def folder(name: str) -> str:
    """The folder (or top-level module) a module belongs to: hyimage.offload.planner -> hyimage.offload."""
    return ".".join(name.split(".")[:2])


def test_no_import_cycle_between_modules() -> None:
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_import_cycle_between_folders() -> None:
    """Folders as layers: an import from a folder to one that imports it back would be an arrow up a layer."""
    edges, _ = graph()
    folders: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            if folder(source) != folder(target) and folder(target) != "hyimage":
                folders[folder(source)].add(folder(target))
    assert cycles(folders) == []


def test_imports_inside_functions_defer_a_heavy_or_optional_dependency() -> None:
    _, inner = graph()
    unexplained = [f"{name}:{line}: {text.strip()}" for name, line, text in inner if "# deferred:" not in text]
    assert unexplained == []
    assert len(inner) <= MAX_DEFERRED


def test_the_graph_reader_sees_a_cycle() -> None:
    """The cycle finder itself: two modules importing each other are one component."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
