"""Readers of untrusted files (issue 24, findings 8, 10, 11, 13, 15, 19): valid files read whatever their
header length, hostile ones refused with a message naming the file, bombs and hangs bounded.

The hangs and memory bombs run in `support/scripts/hostile_driver.py` (a subprocess, each case in a forked child with its
address space capped and a time limit), so that a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.hostile import (
    SPECIAL_HEADER_LENGTHS, bad_gguf, bad_pth, bad_safetensors, model_folder_variants, one_tensor, problems,
    pth_archive, run_driver, tensor_pickle,
)

from mlx_video.convert.formats import PthTensors, SafetensorsTensors, open_tensors
from mlx_video.convert.gguf import GGUFFile
from mlx_video.errors import MlxVideoError
from mlx_video.io.safetensors import SafetensorsFile
from mlx_video.model_folder import ModelFolder

# ---------------------------------------------------------------------------------------------------
# finding 8: a safetensors file is recognised whatever the low byte of its header length


def test_safetensors_read_whatever_the_header_length_modulo_256(tmp_path):
    lengths = [256 + r for r in range(256)] + SPECIAL_HEADER_LENGTHS
    want = np.arange(6, dtype=np.float32).reshape(2, 3)
    for n in lengths:
        for name in (f"m{n}.safetensors", f"m{n}.bin", f"m{n}"):
            path = tmp_path / name
            path.write_bytes(one_tensor(n))
            tensors = open_tensors(path, "the transformer")
            assert isinstance(tensors, SafetensorsTensors), (n, name)
            np.testing.assert_array_equal(np.array(tensors.read("w")), want)


def test_other_formats_are_still_told_apart(tmp_path):
    pth = pth_archive(tmp_path / "m.bin", tensor_pickle({"w": ("0", "FloatStorage", 6, 0, (2, 3), (3, 1))}),
                      {"0": np.arange(6, dtype=np.float32).tobytes()})
    tensors = open_tensors(pth, "x")
    assert isinstance(tensors, PthTensors)
    np.testing.assert_array_equal(np.array(tensors.read("w")), np.arange(6, dtype=np.float32).reshape(2, 3))
    gguf = tmp_path / "noext"
    gguf.write_bytes(bad_gguf()["gguf-version-1"])
    with pytest.raises(MlxVideoError, match="GGUF v1"):
        open_tensors(gguf, "x")


# ---------------------------------------------------------------------------------------------------
# finding 13 (readers): malformed headers are refused with the file and the field named


@pytest.mark.parametrize("name", sorted(bad_safetensors()))
def test_malformed_safetensors_header_is_refused_by_name(tmp_path, name):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bad_safetensors()[name])
    with pytest.raises(MlxVideoError) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", sorted(bad_gguf()))
def test_malformed_gguf_is_refused_by_name(tmp_path, name):
    path = tmp_path / "bad.gguf"
    path.write_bytes(bad_gguf()[name])
    with pytest.raises(MlxVideoError) as info:
        GGUFFile(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------
# findings 13 and 15: a model folder is checked whole when it is opened, before any long work


def fake_model_folder(folder: Path) -> Path:
    """A converted folder as `mlxvid convert` lays it out, with small random weights (the checks at open read
    only the manifest, configs, indexes and shard headers)."""
    folder.mkdir()
    components = {"transformer": (4, 6), "text_encoder": (3, 5), "vae": (2, 2)}
    manifest = {"format_version": 1, "family": "wan", "model": "wan2.2-ti2v-5b", "dtype": "float32",
                "components": list(components)}
    (folder / "mlxvid.json").write_text(json.dumps(manifest))
    for comp, shape in components.items():
        (folder / comp).mkdir()
        (folder / comp / "config.json").write_text("{}")
        shard = "model-00001-of-00001.safetensors"
        weights = {"a.weight": mx.random.normal(shape), "b.bias": mx.zeros(shape[:1])}
        mx.save_safetensors(str(folder / comp / shard), weights)
        index = {"weight_map": {k: shard for k in weights}}
        (folder / comp / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_broken_model_folders_are_refused_at_open_naming_the_file(tmp_path):
    model = fake_model_folder(tmp_path / "model")
    ModelFolder.open(model).spec  # the intact folder opens
    variants = model_folder_variants(model, tmp_path)
    assert len(variants) >= 18
    for name, folder in variants.items():
        with pytest.raises(MlxVideoError) as info:
            ModelFolder.open(folder).spec
        assert str(folder) in str(info.value), name
    assert (tmp_path / "user").exists() is False  # nothing outside the folder was touched or made


# ---------------------------------------------------------------------------------------------------
# findings 10 and 11: hangs and memory bombs, each in a child with 5 s and 1 GiB


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    files = bad_pth(folder)
    rife = pth_archive(folder / "flownet.pkl", tensor_pickle(
        {"module.block0.conv0.0.0.weight": ("0", "FloatStorage", 1, 0, (1 << 15, 1 << 15), (0, 0))}), {"0": bytes(4)})
    open_all = "from mlx_video.convert.pth import PthCheckpoint\nc = PthCheckpoint({!r})\nfor k in c.keys(): c.get(k)"
    cases = [
        {"name": "shared-list", "code": open_all.format(str(files["pth-shared-list-40"]))},
        {"name": "stride0-2**31", "code": open_all.format(str(files["pth-stride0-2**31"]))},
        {"name": "stride0-2**34", "code": open_all.format(str(files["pth-stride0-2**34"]))},
        {"name": "deflated-storage", "code": "from mlx_video.convert.pth import PthCheckpoint\n"
                                             f"c = PthCheckpoint({str(files['pth-deflated-storage-2GiB'])!r})\n"
                                             "assert c.read_range('w', 1 << 20, 1 << 20).size == 1 << 20"},
        {"name": "deflated-data-pkl", "code": open_all.format(str(files["pth-deflated-data-pkl-1.5GiB"]))},
        {"name": "rife-stride0", "code": f"from mlx_video.rife.weights import load_rife\nload_rife({str(rife)!r})"},
    ]
    return run_driver(cases, folder)


def test_shared_list_pickle_is_refused_in_time(bombs):
    result = bombs["shared-list"]
    assert not problems(result) and result["code"] == 1, problems(result)
    assert "entries" in result["stderr"]


@pytest.mark.parametrize("name", ["stride0-2**31", "stride0-2**34", "rife-stride0"])
def test_expanded_views_over_tiny_storages_are_refused(bombs, name):
    result = bombs[name]
    assert not problems(result) and result["code"] == 1, problems(result)
    assert "view repeating" in result["stderr"]


def test_deflated_storage_is_read_as_a_stream(bombs):
    """A 2 GiB storage deflated into 2 MB: reading one MiB of it holds about one MiB."""
    result = bombs["deflated-storage"]
    assert not problems(result) and result["code"] == 0, problems(result)
    assert result["peak_bytes"] < 400 << 20


def test_deflated_pickle_bomb_is_refused_before_reading(bombs):
    result = bombs["deflated-data-pkl"]
    assert not problems(result) and result["code"] == 1, problems(result)
    assert "data.pkl claims" in result["stderr"]


# ---------------------------------------------------------------------------------------------------
# finding 19 (interpolate): an unwritable destination is refused before any work


def test_interpolate_to_an_impossible_destination_is_refused_first(tmp_path):
    from PIL import Image

    from mlx_video.interpolate import interpolate_file

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(frames / f"{i:04d}.png")
    weights = tmp_path / "rife"
    weights.mkdir()
    (weights / "config.json").write_text("{}")  # never read: the destination is checked first
    (weights / "model.safetensors").write_bytes(b"")
    blocker = tmp_path / "a-file"
    blocker.write_text("the user's")
    with pytest.raises(MlxVideoError, match="is not a folder"):
        interpolate_file(frames, blocker / "out.mp4", weights=weights, fps=8, progress=False)
    assert blocker.read_text() == "the user's"


def test_side_tensors_read_before_the_shape_checks_are_bounded(tmp_path, monkeypatch):
    """A comfy_quant blob or an embedded tokenizer is read whole while planning: each has a size bound."""
    import mlx_video.convert.formats as formats

    monkeypatch.setattr(formats, "MAX_SPIECE_BYTES", 1000)
    path = tmp_path / "te.safetensors"
    header = {"spiece_model": {"dtype": "U8", "shape": [1001], "data_offsets": [0, 1001]},
              "x.comfy_quant": {"dtype": "U8", "shape": [(1 << 20) + 1], "data_offsets": [1001, 1001 + (1 << 20) + 1]}}
    from support.hostile import safetensors_bytes

    path.write_bytes(safetensors_bytes(header, bytes(1001 + (1 << 20) + 1)))
    with pytest.raises(MlxVideoError, match="larger than a comfy_quant JSON blob"):
        formats.ComponentSource(open_tensors(path, "te"), "te")
    header.pop("x.comfy_quant")
    path.write_bytes(safetensors_bytes(header, bytes(1001)))
    with pytest.raises(MlxVideoError, match="spiece_model tensor holds 1001 bytes"):
        formats.embedded_spiece(formats.ComponentSource(open_tensors(path, "te"), "te"))


@pytest.mark.parametrize("name", ["negative-shape", "2**64-shape-times-0", "bool-shape", "float-offsets", "string-metadata"])
def test_lora_headers_are_checked_strictly(tmp_path, name):
    """MLX's own loader takes these headers (a negative or overflowing shape, float offsets); a LoRA file is
    checked by our reader first."""
    from support.hostile import safetensors_bytes

    from mlx_video.lora import read_lora

    path = tmp_path / "lora.safetensors"
    raw = bad_safetensors()[name]
    n = int(np.frombuffer(raw[:8], dtype="<u8")[0])
    header = raw[8 : 8 + n].replace(b'"w"', b'"blocks.0.attn.q.lora_A.weight"')  # a LoRA name, a bad entry
    path.write_bytes(safetensors_bytes(header, raw[8 + n :]))
    with pytest.raises(MlxVideoError, match=r"malformed|needs \d+ bytes|__metadata__") as info:
        read_lora(path, [])
    assert str(path) in str(info.value)
