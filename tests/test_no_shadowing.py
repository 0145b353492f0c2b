"""Nothing importable from the repository root may shadow a module that an installed dependency imports.

`python -m pytest` puts the repository root on `sys.path`, pytest's default import mode puts `tests/` there,
and some tests add `benchmarks/`. A folder with an `__init__.py` or a `.py` file in any of them is then found
before site-packages: a top-level `kernels/` package once hid Hugging Face's `kernels`, which transformers
5.25 imports, and every diffusers test failed at collection.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The folders that end up on sys.path during the tests: the root (python -m pytest), tests/ (pytest's prepend
# import mode, since tests/ has no __init__.py) and benchmarks/ (added by tests that import the harnesses).
SEARCHED = {"": ROOT, "tests": ROOT / "tests", "benchmarks": ROOT / "benchmarks"}
OURS = {"mlx_video"}


def importable_names(folder: Path) -> set[str]:
    """Top-level module names a folder on sys.path provides: `*.py` files and folders with an `__init__.py`."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.parent.name for p in folder.glob("*/__init__.py")}
    return names


def installed_top_level() -> dict[str, list[str]]:
    """Top-level module name -> the installed distributions that provide it (ours left out)."""
    found = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in found.items() if "mlxvid" not in dists}


def clashes(folder: Path, installed: dict[str, list[str]]) -> dict[str, list[str]]:
    return {n: installed[n] for n in importable_names(folder) - OURS if n in installed}


def test_no_top_level_name_shadows_an_installed_module():
    installed = installed_top_level()
    assert "kernels" in installed or "torch" in installed, "the test environment lists no distributions"
    found = {f"{label or '.'}/{name}": dists
             for label, folder in SEARCHED.items() for name, dists in clashes(folder, installed).items()}
    stdlib = {f"{label or '.'}/{name}" for label, folder in SEARCHED.items()
              for name in importable_names(folder) & set(sys.stdlib_module_names)}
    assert not found, f"these names shadow installed distributions' modules (rename them): {found}"
    assert not stdlib, f"these names shadow standard-library modules (rename them): {sorted(stdlib)}"


def test_the_check_sees_a_shadowing_package(tmp_path):
    """The check itself: a folder holding a `kernels/__init__.py` (the old layout) is flagged."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "data_only").mkdir()  # no __init__.py: a namespace portion loses to any regular package
    assert set(clashes(tmp_path, {"kernels": ["kernels"], "torch": ["torch"], "data_only": ["x"]})) == {
        "kernels", "torch"}


def test_tests_add_no_other_folder_to_sys_path():
    """Every sys.path insertion in the tests names one of the folders checked above."""
    pattern = re.compile(r"sys\.path\.(?:insert|append)\((.*)\)")
    for path in (ROOT / "tests").rglob("*.py"):
        if "fixtures" in path.relative_to(ROOT / "tests").parts:
            continue  # recording scripts run by hand (tests/fixtures/*/make_*.py), never imported by the suite
        for call in pattern.findall(path.read_text(encoding="utf-8")):
            if "sys.path" in call:
                continue
            assert any(f'"{label}"' in call for label in SEARCHED if label), f"{path.name}: sys.path gets {call}"
