"""The wheel ships the runtime (with the converter inside it) and adds no generic top-level module."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed, so the wheel cannot be built offline")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("mlxvid-*.whl")
    return zipfile.ZipFile(wheel)


def test_only_mlx_video_at_the_top(wheel):
    top = {n.split("/")[0] for n in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mlx_video"}


def test_every_runtime_package_is_shipped(wheel):
    sources = {
        f"mlx_video/{p.relative_to(ROOT / 'mlx_video').as_posix()}" for p in (ROOT / "mlx_video").rglob("*.py")
    } | {f"mlx_video/convert/{p.name}" for p in (ROOT / "convert").glob("*.py")}
    missing = sorted(sources - set(wheel.namelist()))
    assert not missing, f"not in the wheel (add the package to pyproject.toml): {missing}"


def test_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "mlxvid = mlx_video.entry:main" in wheel.read(entry_points).decode()


def test_kernel_sources_are_shipped(wheel):
    """The Metal / CUDA kernel sources (kernels/ in the checkout) install as mlx_video/kernel_sources/."""
    root = ROOT / "kernels"
    needed = [p for pattern in ("common/*.h", "metal/*.metal", "cuda/*.cu") for p in root.glob(pattern)]
    assert needed, "no kernel sources found in kernels/"
    names = set(wheel.namelist())
    missing = sorted(
        f"mlx_video/kernel_sources/{p.relative_to(root).as_posix()}"
        for p in needed
        if f"mlx_video/kernel_sources/{p.relative_to(root).as_posix()}" not in names
    )
    assert not missing, f"kernel sources not in the wheel: {missing}"
    assert not [n for n in names if n.startswith("mlx_video/kernel_sources/tests/")]  # host tests stay out
    # kernels/ is data, not a package: an __init__.py would make `import kernels` from the repository root find
    # it instead of Hugging Face's `kernels`, which transformers imports (see tests/test_no_shadowing.py).
    assert not (root / "__init__.py").exists()


def test_installed_wheel_finds_its_kernel_sources(wheel, tmp_path):
    """From an unpacked wheel, mlx_video.kernels reads the sources of the installed package."""
    wheel.extractall(tmp_path)
    code = (
        "import mlx_video.kernels as k; print(k.source_dir()); "
        "h, b = k.kernel_source('mlxvid_rope_qk', 'metal'); assert 'mlxvid_rope_pair' in h and b.strip()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "mlx_video" / "kernel_sources"
