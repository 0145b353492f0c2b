"""A family is one package: a throw-away fourth family, built in a temporary folder from a renamed copy of the Wan
package, is discovered with no edit to any shared file, and `convert` and `generate` run end to end on it.

The copy renames the family ("wan" -> "kiwi"), its model ids and the diffusers pipeline class it claims
("Wan..." -> "Kiwi..."); the tiny diffusers checkpoint is a TI2V-5B-style Wan whose model_index.json names
`KiwiPipeline`. The Kiwi video must then equal, bit for bit, the one the Wan family makes from the same weights.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import mlx_video.families as families  # noqa: E402
from mlx_video.cli import main  # noqa: E402
from mlx_video.registry import MODELS, collect_models  # noqa: E402

WAN_PACKAGE = Path(families.__file__).parent / "wan"
PROMPT = "a corgi surfs a wave at sunset"

# The whole rename: the package path, the family name, its model ids and the pipeline class its planner claims;
# and it gives up the catch-all planner role (one family has it).
RENAMES = [
    (r"mlx_video\.families\.wan\b", "mlx_video.families.kiwi"),
    (r'"wan"', '"kiwi"'),
    (r"\bwan2\.([12])-", r"kiwi2.\1-"),
    (r'startswith\("Wan"\)', 'startswith("Kiwi")'),
    (r"catch_all=True", "catch_all=False"),
    (r"order=0\b", "order=50"),
]


def _renamed_copy(folder: Path) -> Path:
    target = folder / "kiwi"
    shutil.copytree(WAN_PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.glob("*.py"):
        text = path.read_text()
        for pattern, replacement in RENAMES:
            text = re.sub(pattern, replacement, text)
        path.write_text(text)
    return target


@pytest.fixture
def kiwi_family(tmp_path):
    """The copy's folder added to the family folder's search path (what a new package in mlx_video/families/ is),
    then everything put back."""
    extra = tmp_path / "extra_families"
    extra.mkdir()
    _renamed_copy(extra)
    families.__path__.append(str(extra))
    try:
        families.discover()
        collect_models()
        yield extra / "kiwi"
    finally:
        families.__path__.remove(str(extra))
        for name in [m for m in sys.modules if m == "mlx_video.families.kiwi" or m.startswith("mlx_video.families.kiwi.")]:
            del sys.modules[name]
        families.discover()
        collect_models()


def _tiny_checkpoint(root: Path, pipeline_class: str) -> Path:
    from support.wan import build_tiny_wan_pipeline

    folder = root / pipeline_class
    build_tiny_wan_pipeline(folder, two_experts=False, wan22_vae=True, shift=5.0, seed=3, heads=3)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = pipeline_class
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_renamed_family_in_a_new_package_converts_and_generates(kiwi_family, tmp_path):
    assert "kiwi" in families.FAMILIES and "kiwi2.2-ti2v-5b" in MODELS and MODELS["kiwi2.2-ti2v-5b"].family == "kiwi"
    assert families.pipeline_class("kiwi").__module__ == "mlx_video.families.kiwi.pipeline"
    assert families.converter("kiwi").__file__.startswith(str(kiwi_family))

    src = _tiny_checkpoint(tmp_path, "WanPipeline")
    kiwi_src = tmp_path / "KiwiPipeline"
    shutil.copytree(src, kiwi_src)
    index = json.loads((kiwi_src / "model_index.json").read_text())
    (kiwi_src / "model_index.json").write_text(json.dumps(dict(index, _class_name="KiwiPipeline")))

    videos = {}
    for name, folder in (("wan", src), ("kiwi", kiwi_src)):
        out = tmp_path / f"{name}-mlx"
        main(["convert", str(folder), str(out), "--dtype", "fp32"])
        manifest = json.loads((out / "mlxvid.json").read_text())
        assert (manifest["family"], manifest["model"]) == (name, f"{name}2.2-ti2v-5b")
        main(["generate", "--model", str(out), "--prompt", PROMPT, "--size", "64x32", "--frames", "1", "--steps", "2",
              "--seed", "7", "--output", str(tmp_path / f"{name}.mp4"), "--save-latents", str(tmp_path / f"{name}-latents.npy"),
              "--quiet"])
        sidecar = json.loads((tmp_path / f"{name}.json").read_text())
        assert sidecar["settings"]["model"] == f"{name}2.2-ti2v-5b"
        videos[name] = np.load(tmp_path / f"{name}-latents.npy")
        assert (tmp_path / f"{name}.mp4").stat().st_size > 0
    np.testing.assert_array_equal(videos["kiwi"], videos["wan"])


def test_shipped_families_are_exactly_the_packages():
    shipped = sorted(p.name for p in Path(families.__file__).parent.iterdir()
                     if (p / "__init__.py").is_file() and not p.name.startswith("_"))
    assert sorted(families.FAMILIES) == shipped
    assert {spec.family for spec in MODELS.values()} == set(shipped)
    assert "kiwi" not in families.FAMILIES and not any(m.startswith("kiwi") for m in MODELS)
