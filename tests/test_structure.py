"""The shape of the code: no import cycles, no private names imported across modules, no two modules of one
name outside the family packages, and shared code that names no family.

Every module of the runtime (`mlx_video/`, with `convert/` as `mlx_video.convert`) is read with `ast`; imports
inside functions count as much as those at the top (an import deferred into a function hides a cycle, it does
not remove it).
"""

from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

import mlx_video.families as families
from mlx_video.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]
FAMILY_FOLDER = ROOT / "mlx_video" / "families"


def _modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "mlx_video", "mlx_video"), (ROOT / "convert", "mlx_video.convert")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=None)
def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement of `module`, anywhere in it."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles between modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_imported_name_exists():
    """An import inside a function runs only when the function does: a name that moved or went away must fail here."""
    import importlib

    missing = []
    for m in MODULES:
        for target, name, line in _imports(m):
            if not target.startswith("mlx_video") or target not in MODULES:
                continue
            module = importlib.import_module(target)
            if name is not None and name != "*" and not hasattr(module, name):
                missing.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {name} from {target}, which has none")
    tests = [p for p in (ROOT / "tests").rglob("*.py") if "fixtures" not in p.relative_to(ROOT / "tests").parts]
    for path in sorted(tests) + sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mlx_video"):
                if node.module not in MODULES:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}, which does not exist")
                    continue
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name} from {node.module}, which has none"
                            for a in node.names if not hasattr(module, a.name)
                            and f"{node.module}.{a.name}" not in MODULES]
    assert not missing, "\n".join(missing)


def test_no_private_name_is_imported_from_another_module():
    found = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name} from {target}"
             for m in MODULES for target, name, line in _imports(m)
             if name is not None and name.startswith("_") and not name.startswith("__") and target != m]
    found += [f"{MODULES[m].relative_to(ROOT)}:{line} imports the private module {target}"
              for m in MODULES for target, name, line in _imports(m)
              if name is None and target.startswith("mlx_video") and target.rpartition(".")[2].startswith("_")
              and not target.endswith("__init__")]
    assert not found, "\n".join(found)


def test_module_names_are_unique_outside_the_family_packages():
    """Family packages share their module names on purpose (pipeline, planner, keys, config, ...: the same role
    in each family); anywhere else, two modules of one name mislead."""
    by_name: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        if path.name == "__init__.py" or FAMILY_FOLDER in path.parents:
            continue
        by_name.setdefault(path.stem, []).append(name)
    family_roles = {p.stem for p in FAMILY_FOLDER.glob("*/*.py")}
    clashes = {n: ms for n, ms in by_name.items() if len(ms) > 1 or n in family_roles or n in families.FAMILIES}
    assert not clashes, clashes


# ---- shared code names no family -------------------------------------------------------------------------


def _shared_modules() -> list[str]:
    return [m for m, p in MODULES.items() if FAMILY_FOLDER not in p.parents]


def _code_tokens(path: Path):
    """(line, token text) of the names and string literals of a module, docstrings and comments left out."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.add(body[0].value.lineno)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME or (tok.type == tokenize.STRING and tok.start[0] not in docstrings):
            yield tok.start[0], tok.string


def _family_words() -> re.Pattern:
    ids = sorted(MODELS, key=len, reverse=True)
    names = sorted(families.FAMILIES, key=len, reverse=True)
    return re.compile(r"(?i)(?:\b|_)(" + "|".join(map(re.escape, names)) + r")(?:\b|_|\d)|"
                      + "|".join(map(re.escape, ids)))


def _names_a_family(path: Path) -> list[str]:
    words = _family_words()
    hits = []
    for line, text in _code_tokens(path):
        if text[:1] in "\"'" or text[:2].lower() in ("f\"", "f'", "r\"", "r'") or text[:3].lower() in ("rb\"", "br\""):
            # a string: flagged when it is a family's name or holds a model id or a family module path
            body = text.strip("rbfRBF").strip("\"'")
            if body.lower() in families.FAMILIES or any(i in body for i in MODELS) or "families." in body:
                hits.append(f"{line}: {text}")
        elif words.search(text):
            hits.append(f"{line}: {text}")
    return hits


def test_no_family_file_outside_the_family_packages():
    """A family's files live in its package: no module elsewhere is named after a family or one of its models."""
    words = _family_words()
    stray = [str(p.relative_to(ROOT)) for m, p in MODULES.items() if FAMILY_FOLDER not in p.parents
             and any(words.search(part) for part in p.relative_to(ROOT).with_suffix("").parts)]
    assert not stray, stray


def test_shared_code_names_no_family():
    found = {}
    for m in _shared_modules():
        where = str(MODULES[m].relative_to(ROOT))
        hits = _names_a_family(MODULES[m])
        if hits:
            found[where] = hits
    assert not found, found


BENCHMARKS = ROOT / "benchmarks"
# Scripts that still name a family, each for a reason of its own (the list only shrinks; a new file is checked):
# ports.py times other projects' ports of one family's model against ours (that family's by nature);
# chain_bench.py builds the tiny test pipeline of one family (tests' support) and patches its pipeline's decode;
# it could take its model through Family.bench once a case declares a tiny pipeline.
NAMES_A_FAMILY_FOR_NOW = {"ports.py", "chain_bench.py"}


def test_benchmarks_name_no_family():
    """benchmarks/ is shared code too: a family's benchmark facts (its step, VAE case, reference as data, GPU check
    sizes) live in its package (`Family.bench`, mlx_video/bench_case.py), and no script is named after one."""
    words = _family_words()
    found = {}
    for path in sorted(BENCHMARKS.glob("*.py")):
        hits = [] if path.name in NAMES_A_FAMILY_FOR_NOW else _names_a_family(path)
        if words.search(path.stem):
            hits.insert(0, f"the file's name: {path.name}")
        if hits:
            found[path.name] = hits
    assert not found, found
    assert all((BENCHMARKS / name).is_file() for name in NAMES_A_FAMILY_FOR_NOW)  # the list names real files


def test_the_family_name_check_sees_a_family(tmp_path):
    path = tmp_path / "shared.py"
    path.write_text('"""Docs may say Wan and mochi-1-preview."""\n# and comments: hunyuan\n'
                    'def pick(spec):\n    return spec.family == "wan"\n\nfrom x import hunyuan_table\n'
                    'MODEL = "mochi-1-preview"\n')
    hits = _names_a_family(path)
    assert [h.split(":")[0] for h in hits] == ["4", "6", "7"], hits


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_each_family_is_one_package(name):
    """Everything a family declares lives in its own package."""
    family = families.get_family(name)
    assert family.package == f"mlx_video.families.{name}"
    paths = [family.pipeline, family.converter, family.cost, *(p for _, p in family.task_pipelines),
             *(p for p in (family.latent_rgb, family.mag_tables, family.recipes, family.bench) if p)]
    for path in paths:
        module = path.partition(":")[0]
        assert (FAMILY_FOLDER / name / f"{module}.py").is_file(), path
        families.load(family, path)


def test_no_family_imports_another_family():
    """A family package uses shared code only: what two families share (an encoder's key table, a block) lives in
    the shared packages, so one family can be removed or renamed without breaking another."""
    found = []
    for m in MODULES:
        if not m.startswith("mlx_video.families."):
            continue
        own = m.split(".")[2]
        found += [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}" for target, _, line in _imports(m)
                  if target.startswith("mlx_video.families.") and target.split(".")[2] != own]
    assert not found, "\n".join(found)


# ---- conversion in named steps --------------------------------------------------------------------------

MAX_LINES, MAX_COMPLEXITY = 80, 15


def _complexity(fn: ast.AST) -> int:
    """McCabe's count: 1 + each if/elif, loop, except handler and boolean operator (nested functions apart)."""
    n, stack = 1, list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler)):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        stack.extend(ast.iter_child_nodes(node))
    return n


def _conversion_modules() -> list[Path]:
    """convert/ and what the family packages hold of the conversion: planners, key tables, config readers."""
    family_parts = [p for p in FAMILY_FOLDER.glob("*/*.py")
                    if p.stem in ("planner", "keys", "config_from_shapes", "official_vae") or p.stem.endswith("_keys")]
    return sorted((ROOT / "convert").glob("*.py")) + sorted(family_parts) + [ROOT / "mlx_video" / "rife" / "weights.py"]


def _oversized(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines, complexity = node.end_lineno - node.lineno + 1, _complexity(node)
            if lines > MAX_LINES or complexity > MAX_COMPLEXITY:
                out.append(f"{path.name}:{node.lineno} {node.name}: {lines} lines, complexity {complexity}")
    return out


def test_conversion_functions_fit_on_a_screen():
    found = [hit for path in _conversion_modules() for hit in _oversized(path)]
    assert not found, "\n".join(found)


def test_the_size_check_sees_a_long_branchy_function(tmp_path):
    body = "".join(f"    if x == {i} or x == -{i}:\n        return {i}\n" for i in range(10))
    path = tmp_path / "probe.py"
    path.write_text("def f(x):\n" + body + "    return None\n")
    (hit,) = _oversized(path)
    assert "22 lines, complexity 21" in hit
