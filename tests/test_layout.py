"""The code's layout: no import cycles, lib/ never imports the top-level scripts, no module over 600 lines."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Project modules by dotted name: the top-level .py files and the lib package."""
    found = {p.stem: p for p in REPO.glob("*.py")}
    found.update({f"lib.{p.stem}": p for p in (REPO / "lib").glob("*.py") if p.stem != "__init__"})
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports, at any depth (lazy imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of module names, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_lib_never_imports_top_level_modules():
    offenders = {name: sorted(d for d in deps if not d.startswith("lib."))
                 for name, deps in _graph().items() if name.startswith("lib.")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_over_600_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
