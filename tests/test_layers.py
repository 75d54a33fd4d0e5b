"""The package's layers (docs/architecture.md): imports go only downwards and no two modules import each other.

The import graph is built from the installed package's source with `ast` (no
module under test is executed): every `import`/`from ... import` anywhere in
a module counts, at its top or inside a function, so no deferred import can
hide a cycle or an upward import.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

# Lowest first. A module may import the modules of its own group and of the groups in lower layers, nothing else.
LAYERS = (
    {"kernels": ("pact.kernels",)},
    {"cross-cutting": ("pact.errors", "pact.checks", "pact.devices", "pact.files", "pact.distributed")},
    {"data": ("pact.data",), "models": ("pact.models",)},
    {"objective": ("pact.objective",)},
    {"cache": ("pact.cache_tools",)},
    {"planning": ("pact.planning",), "evaluation": ("pact.evaluation",)},
    {"training": ("pact.training",)},
    {"commands": ("pact.cli",), "integrations": ("pact.integrations",)},
)
PUBLIC_API = "pact"  # `pact/__init__.py` re-exports the layers' public names: it sits above them all


def group_of(module: str) -> tuple[int, str] | None:
    """(layer index, group name) of a module of ours, None for the public API module and for modules outside `pact`."""
    for index, groups in enumerate(LAYERS):
        for name, prefixes in groups.items():
            if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
                return index, name
    return None


def package_sources() -> dict[str, Path]:
    """Every module of the installed package by dotted name, found from the package's own locations (the subpackages
    installed from other folders, `pact.kernels` and `pact.cache_tools`, included)."""
    roots = {"pact": Path(importlib.util.find_spec("pact").origin).parent}
    for mapped in ("pact.kernels", "pact.cache_tools"):
        roots[mapped] = Path(importlib.util.find_spec(mapped).origin).parent
    sources = {}
    for package, root in roots.items():
        for path in root.rglob("*.py"):
            relative = path.relative_to(root).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            if package == "pact" and parts and parts[0] in ("kernels", "cache_tools"):
                continue  # a checkout's folder of that name, if any, is not what is installed
            sources[name] = path
    return sources


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `module` imports anywhere in its source (relative imports resolved); `from X import y`
    counts as importing `X.y` when that is a module, else `X`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports."""
    sources = package_sources()
    known = set(sources)
    return {module: imports_of(module, path, known) for module, path in sources.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes to a higher layer, or sideways to another group of the same layer."""
    problems = []
    for module, targets in sorted(graph.items()):
        here = group_of(module)
        if here is None:
            continue
        for target in sorted(targets):
            there = group_of(target)
            if there is None:
                problems.append(f"{module} imports {target}, the public API module above every layer")
            elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                problems.append(f"{module} ({here[1]}) imports {target} ({there[1]}), which is not below it")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    """No module of the package sits outside the layer table (a new top-level module must be placed in it)."""
    unplaced = [module for module in import_graph() if module != PUBLIC_API and group_of(module) is None]
    assert not unplaced, f"modules outside the layer table: {unplaced}"


def test_imports_only_go_down():
    """No module imports a module of a higher layer, or of another group of its own layer."""
    problems = upward_imports(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    """No two modules import each other, directly or through others."""
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_kernels_import_nothing_of_the_project():
    """`pact.kernels` is a leaf: tensors in, tensors out; it imports only its own modules."""
    graph = import_graph()
    outside = {module: sorted(t for t in targets if not t.startswith("pact.kernels"))
               for module, targets in graph.items() if module.startswith("pact.kernels")}
    assert not any(outside.values()), outside


@pytest.mark.parametrize("planted, expected", [
    ({"pact.data.rows": {"pact.training.trainer"}}, "pact.data.rows (data) imports pact.training.trainer (training), which is not below it"),
    ({"pact.planning.plan": {"pact.evaluation.drift"}}, "pact.planning.plan (planning) imports pact.evaluation.drift (evaluation)"),
    ({"pact.kernels.reference": {"pact.errors"}}, "pact.kernels.reference (kernels) imports pact.errors (cross-cutting)"),
])
def test_the_check_names_a_planted_upward_import(planted, expected):
    """The checks are not vacuous: an upward or sideways import planted into the real graph is named."""
    graph = import_graph()
    for module, targets in planted.items():
        graph[module] = graph.get(module, set()) | targets
    assert any(problem.startswith(expected) for problem in upward_imports(graph)), upward_imports(graph)


def test_the_check_finds_a_planted_cycle():
    """A cycle planted into the real graph (a low module importing one that imports it back) is found."""
    graph = import_graph()
    graph["pact.data.sources"] = graph["pact.data.sources"] | {"pact.data.rows"}
    assert ["pact.data.rows", "pact.data.sources"] in cycles(graph)
