"""The tests' own layout: what test modules share lives in `tests/support/`, and no test module imports another.

A test module that imports another runs that module's top level (its fixtures, its skips) and ties the two
files together: one can then pass only in the company of the other. Imports inside functions count as much as
those at the top. `tests/fixtures/` holds recording scripts run by hand, not part of the suite.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import support

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"


def suite_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "fixtures" not in p.relative_to(TESTS).parts)


def imports_of_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, imported name) for every import of a `test_*` module in `source`, wherever the import stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if any(p.startswith("test_") for p in a.name.split("."))]
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if any(p.startswith("test_") for p in parts):
                found.append((node.lineno, node.module))
            elif node.level or parts[-1] in ("tests", "support"):  # from . import test_x, from tests import test_x
                found += [(node.lineno, a.name) for a in node.names if a.name.startswith("test_")]
    return found


def test_no_test_module_imports_another():
    found = [f"{path.relative_to(TESTS)}:{line} imports {name}"
             for path in suite_files() for line, name in imports_of_test_modules(path.read_text(encoding="utf-8"))]
    assert not found, "move what is shared into tests/support/ and import it from there:\n" + "\n".join(found)


def test_the_import_check_sees_deferred_and_relative_imports():
    source = ("import os\nfrom support.wan import randomize_\n\n\ndef f():\n    from test_wan_animate import load\n"
              "    import test_umt5 as t\n    from . import test_chains\n    from tests.test_x import y\n")
    assert imports_of_test_modules(source) == [(6, "test_wan_animate"), (7, "test_umt5"), (8, "test_chains"),
                                           (9, "tests.test_x")]


def test_helpers_live_only_in_the_support_package():
    """Outside `tests/support/` (and the hand-run `tests/fixtures/`) every file is a test module or conftest."""
    stray = [str(p.relative_to(TESTS)) for p in suite_files()
             if SUPPORT not in p.parents and not (p.name.startswith("test_") or p.name == "conftest.py")]
    assert not stray, f"helper modules outside tests/support/ (move them there): {stray}"
    tests_inside = [str(p.relative_to(TESTS)) for p in SUPPORT.rglob("test_*.py")]
    assert not tests_inside, f"test modules inside tests/support/ (pytest would collect them twice): {tests_inside}"


def test_the_support_map_names_every_module():
    """`support/__init__.py`'s docstring says what is where: every module and folder of the package is named."""
    named = set(re.findall(r"`([\w/.]+)`", support.__doc__))
    modules = {p.stem for p in SUPPORT.glob("*.py") if p.stem != "__init__"}
    folders = {f"{p.name}/" for p in SUPPORT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    inner = {p.stem for folder in SUPPORT.iterdir() if folder.is_dir() for p in folder.glob("*.py")}
    missing = sorted((modules | folders | (inner - {"__init__"})) - named - {n.removesuffix(".py") for n in named})
    assert not missing, f"tests/support/__init__.py does not say what these hold: {missing}"
