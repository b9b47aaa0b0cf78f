"""The test suite mirrors the house: each test file stands alone, shared code lives in helpers.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SHARED = {"helpers", "openai_stub", "service_cases"}  # modules written to be imported by tests (not test modules)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_test_module_imports_another(path: Path) -> None:
    """Importing ``tests.x``, ``test_x`` or ``conftest`` ties a file to its neighbours (or to the rootdir):
    run alone (``pytest tests/test_x.py``) it then fails to collect. Shared code belongs in helpers.py."""
    local = {p.stem for p in TESTS.glob("*.py")} - SHARED
    bad = [f"{path.name}:{line} imports {name}" for line, name in _imported_modules(path)
           if name.split(".")[0] == "tests" or name.split(".")[0] in local]
    assert bad == []


def test_the_heaviest_files_exist_and_are_collected_first(request: pytest.FixtureRequest) -> None:
    """A renamed heavy file would silently drop back to xdist's default place (possibly last, one worker idle).
    In this session's collection the heavy files that were collected come first, in HEAVIEST_FILES's order."""
    from helpers import HEAVIEST_FILES

    assert len(set(HEAVIEST_FILES)) == len(HEAVIEST_FILES)
    assert [name for name in HEAVIEST_FILES if not (TESTS / name).is_file()] == []
    files = list(dict.fromkeys(item.path.name for item in request.session.items))
    heavy = [name for name in HEAVIEST_FILES if name in files]
    assert files[:len(heavy)] == heavy
