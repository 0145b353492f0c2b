"""The hostile set (issue 24): about a hundred hostile or broken files and folders through `mlxvid convert`
and `mlxvid generate`, each in its own child process capped at 5 s and 1 GiB (`support/scripts/hostile_driver.py`).

For every case: success or one clean line of error, no traceback, nothing written outside the case's
destination, nothing of the user's deleted or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from support.hostile import convert_argv, folder_cases, model_folder_variants, problems, run_driver, write_inputs


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (symlinks not followed) with its kind and, for files and links, size and mtime."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            is_file = name in files
            kind = st.st_mode >> 12
            out[os.path.relpath(p, root)] = (kind, st.st_size, st.st_mtime_ns) if is_file else (kind, 0, 0)
    return out


def check_run(root: Path, results: dict[str, dict], before: dict, allowed: set[str]) -> None:
    bad = {name: why for name, result in results.items() if (why := problems(result))}
    assert not bad, "\n".join(f"{name}: {'; '.join(why)}" for name, why in bad.items())
    after = snapshot(root)
    changed = sorted(p for p in before if after.get(p) != before[p] and not p.startswith("driver/"))
    assert not changed, f"changed or deleted: {changed[:10]}"
    made = sorted(p for p in after if p not in before and not p.startswith(tuple(allowed)))
    assert not made, f"written outside the destinations: {made[:10]}"


def test_hostile_files_through_convert(tmp_path):
    files = write_inputs(tmp_path)
    cases = {name: convert_argv(tmp_path, path, name) for name, path in files.items()}
    cases.update(folder_cases(tmp_path))
    assert len(cases) >= 80
    (tmp_path / "driver").mkdir()
    before = snapshot(tmp_path)
    results = run_driver([{"name": n, "argv": a} for n, a in cases.items()], tmp_path / "driver")
    assert set(results) == set(cases)
    check_run(tmp_path, results, before, {"driver", "out/"})
    assert not any((tmp_path / "out").glob("*/mlxvid.json"))  # no hostile file made a model


def test_broken_model_folders_and_destinations_through_generate_and_convert(a14b, tmp_path):
    root, _ = a14b
    variants = model_folder_variants(root / "mlx", tmp_path)
    cases = {}
    for name, folder in variants.items():
        cases[name] = ["generate", "--model", str(folder), "--prompt", "a cat", "--quiet", "--size", "48x32",
                       "--frames", "5", "--steps", "2", "--output", str(tmp_path / "out" / f"{name}.mp4")]
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("the user's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-file.part").write_text("not ours")
    (out / "part-link.part").symlink_to(user)
    (out / "part-user.part").mkdir()
    (out / "part-user.part" / "thesis.txt").write_text("the user's thesis")
    for name in ("part-file", "part-link", "part-user"):
        cases[f"dst-{name}"] = ["convert", str(root / "diffusers"), str(out / name), "--dtype", "fp32"]
    cases["dst-under-a-file"] = ["convert", str(root / "diffusers"), str(user / "keep.txt" / "x"), "--dtype", "fp32"]
    (tmp_path / "driver").mkdir()
    before = snapshot(tmp_path)
    results = run_driver([{"name": n, "argv": a} for n, a in cases.items()], tmp_path / "driver")
    for name in variants:  # each refused when the folder is opened, before any denoising
        assert results[name]["code"] == 1, (name, results[name]["stderr"][-300:])
    check_run(tmp_path, results, before, {"driver"})
    assert not any(out.glob("*.mp4"))
