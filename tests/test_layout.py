"""The package keeps the shape docs/architecture.md describes: imports run downwards, with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import kvpolicies

ROOT = Path(kvpolicies.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Our modules that ``path`` can import when it runs, inside functions too (a lazy import still ties two modules
    together), but not under ``if TYPE_CHECKING:``, which never runs."""
    found = set()
    todo = list(ast.parse(path.read_bytes()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        todo += list(ast.iter_child_nodes(node))
    return {name for name in found if name.startswith("kvpolicies.")}


def test_no_import_cycle_inside_the_package():
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {name: {other for other in runtime_imports(path) if other in modules and other != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in sorted(graph[name]):
            assert state.get(other) != "open", "import cycle: " + " -> ".join([*trail, name, other])
            if other not in state:
                visit(other, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_lower_layers_never_import_higher_ones():
    """engine < integrations < experiments < reports < cli: the engine knows nothing of sweeps or pages."""
    order = ["engine", "integrations", "experiments", "reports", "cli"]
    for path in ROOT.rglob("*.py"):
        layer = module_name(path).split(".")[1] if "." in module_name(path) else None
        if layer not in order:
            continue
        for imported in runtime_imports(path):
            target = imported.split(".")[1]
            if target in order:
                assert order.index(target) <= order.index(layer), f"{module_name(path)} imports {imported}"


def test_no_module_passes_the_deprecated_past_key_values_argument():
    """transformers 5.24 renamed it `cache=`; the old name logs a deprecation notice on every generate."""
    offenders = [path.name for folder in (ROOT, ROOT.parent / "plugins", ROOT.parent / "evals")
                 for path in folder.rglob("*.py") if "past_key_values=" in path.read_text()]
    assert offenders == []
