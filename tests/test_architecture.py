"""The shape of the package: no import cycles among curate's modules, and leaf modules that stay leaves.

Modules are read, not imported: every ``import`` and ``from ... import`` counts, at module level or inside a
function (an import put off into a function still ties the two modules together). Folders are mapped to the
packages they install as by pyproject.toml's ``package-dir`` (``stages/`` is ``curate.stages``).
"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Every module of the distribution, by its dotted name."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mods: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([package, *parts])] = path
    return mods


def _named(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement names: its module, and each ``from`` name (a submodule, maybe)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, up level - 1 packages
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        source = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of curate it imports (for each name, the nearest module it falls in)."""
    mods = _modules()
    edges: dict[str, set[str]] = {module: set() for module in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _named(module, path, node):
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges[module].add(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, ``[a, b, ..., a]``, through each group of modules that import each other (Tarjan's
    strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(_cycle_through(min(group), set(group), edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _cycle_through(start: str, group: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest cycle from ``start`` back to it within ``group`` (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v] & group):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_the_graph_sees_every_package_and_imports_inside_functions():
    edges = import_graph()
    assert {"curate.base", "curate.core.stage", "curate.stages.dedup", "curate.train.trainer"} <= set(edges)
    assert "curate.stages.download" in edges["curate.core.registry"]  # imported inside a function


def test_cycles_are_found_and_named():
    edges = defaultdict(set, {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"a"}})
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles(defaultdict(set, {"a": {"b"}, "b": set()})) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in found)


def test_base_imports_nothing_of_curate():
    # curate.base holds the errors, StrictModel and Resources that every layer uses: a leaf, or cycles return.
    assert import_graph()["curate.base"] == set()


def _calls_at_import(tree: ast.AST, name: str) -> list[int]:
    """Lines where ``name(...)`` is called outside any function body: when the module is imported."""
    lines: list[int] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Call):
                func = child.func
                if (isinstance(func, ast.Name) and func.id == name) or (
                    isinstance(func, ast.Attribute) and func.attr == name
                ):
                    lines.append(child.lineno)
            walk(child)

    walk(tree)
    return lines


def test_no_module_declares_columns_or_registers_stages_when_imported():
    # Columns are data of their stage, declared when the stage is registered; test stages are registered
    # by an explicit call. Only the schema declares its core columns, and the registry its builtin stages.
    allowed = {("curate.core.schema", "declare"), ("curate.core.registry", "_register_builtin")}
    support = {f"support.{p.stem}": p for p in (ROOT / "tests" / "support").glob("*.py")}
    found = [
        f"{module}:{line} {name}()"
        for module, path in {**_modules(), **support}.items()
        for name in ("declare", "register", "register_test_stages", "_register_builtin")
        if (module, name) not in allowed
        for line in _calls_at_import(ast.parse(path.read_text()), name)
    ]
    assert not found, found
