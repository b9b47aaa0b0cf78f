"""The house's shape, checked: no import cycles, no module reaching into another's private names.

The layer contracts themselves are import-linter's (``[tool.importlinter]`` in pyproject.toml, run by
``make test``); these tests cover what a layers contract cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = sorted((ROOT / "steerlib").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_tarjan_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycles = [sorted(g) for g in _strongly_connected(graph) if len(g) > 1]
    assert cycles == [["a", "b", "c"]]


def test_no_import_cycles():
    g = grimp.build_graph("steerlib")
    graph = {m: g.find_modules_directly_imported_by(m) for m in g.modules}
    cycles = [sorted(group) for group in _strongly_connected(graph) if len(group) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def _private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``from steerlib.x import _name`` (or ``from .x import _name``) of another module's private name."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(part.startswith("_") and not part.startswith("__") for part in alias.name.split(".")):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name}")
    return found


def test_private_import_check_catches_one(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom steerlib.core.models import _fingerprint, load_model\nimport a._b\n")
    assert _private_imports(sample, tmp_path) == [
        "x.py:2 imports _fingerprint from steerlib.core.models", "x.py:3 imports a._b"]


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_private_names(path):
    assert _private_imports(path) == []


def test_package_modules_do_not_import_the_package_face():
    """Modules import from their own layers, never ``from steerlib import ...`` (which imports everything)."""
    offenders = []
    for path in PACKAGE_FILES:
        if path.name == "__init__.py" and path.parent.name == "steerlib":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "steerlib" and node.level == 0:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
