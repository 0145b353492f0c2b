"""`mlxvid convert` on malformed and malicious input, interrupted runs, and the shard writer.

Every bad input must stop with a clear `MlxVideoError` and leave nothing behind: DST never exists after a
failed conversion, and DST.part exists only when the failure came while writing, in which case a re-run
resumes it. The corpus below has one case per way a checkpoint can be wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from mlx_video.convert.convert import convert_model  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.registry import MODELS  # noqa: E402
from support.wan_checkpoints import Tiny, comfy_file, official_transformer_name, tiny_specs  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch):
    """Every test may name the tiny models: base="tiny-wan" or "tiny-wan-a14b"."""
    for name, spec in tiny_specs().items():
        monkeypatch.setitem(MODELS, name, spec)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = Tiny(tmp_path_factory.mktemp("convert"))
    t.diffusers_folder()
    t.official_folder()
    return t


def copy_diffusers(tiny, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny.diffusers_folder(), src)
    return src


def shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit` to the parsed safetensors header and write it back (data untouched)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])


def save_header_only(path: Path, shapes: dict[str, tuple], dtype: str = "BF16") -> None:
    """A safetensors file of the given shapes whose data is a sparse hole: full size on paper, no disk used."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + offset)


def official_shapes(**config) -> dict[str, tuple]:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return {official_transformer_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


def expect_failure(match: str, src, dst: Path, **kw) -> str:
    with pytest.raises(MlxVideoError, match=match) as info:
        convert_model(src, dst, **kw)
    assert not dst.exists(), "a failed conversion left DST"
    assert not dst.with_name(dst.name + ".part").exists(), "a conversion that failed before writing left DST.part"
    return str(info.value)


def files_kw(tiny, **over):
    official = tiny.official_folder()
    kw = dict(
        base="tiny-wan", dtype="fp32",
        components={"transformer": tiny.comfy("bf16")[0], "text_encoder": official / "models_t5_umt5-xxl-enc-bf16.pth"},
        tokenizer=official / "google" / "umt5-xxl",
    )  # fmt: skip
    for k, v in over.items():
        if k in ("transformer", "transformer_2", "text_encoder", "vae"):
            kw["components"] = {**kw["components"], k: v}
        else:
            kw[k] = v
    return kw


# ---------------------------------------------------------------------------------------------------
# the corpus: folders and files


def test_missing_source(tmp_path):
    expect_failure("does not exist", tmp_path / "nothing", tmp_path / "out")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_failure("cannot tell what", tmp_path / "empty", tmp_path / "out")


def test_already_converted(tiny, tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "mlxvid.json").write_text("{}")
    expect_failure("already an mlxvid model folder", tmp_path / "done", tmp_path / "out")


def test_destination_exists_without_overwrite(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(MlxVideoError, match="already exists; pass --overwrite"):
        convert_model(tiny.diffusers_folder(), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "out.part").exists()


def test_destination_inside_source(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    expect_failure("must not be the source", src, src / "converted")


def test_truncated_shard(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "transformer")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_failure("truncated", src, tmp_path / "out")


def test_corrupt_header_json(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "text_encoder")
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff{{{ not json"
    f.write_bytes(bytes(data))
    expect_failure("corrupt safetensors header", src, tmp_path / "out")


def test_header_length_beyond_file(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "transformer")
    f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])
    expect_failure("truncated or not a safetensors file", src, tmp_path / "out")


def test_overlapping_tensors(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "transformer")

    def edit(h):
        a, b = sorted((k for k in h if k != "__metadata__" and h[k]["dtype"] == "F32" and h[k]["shape"] == [32]))[:2]
        h[b]["data_offsets"] = h[a]["data_offsets"]

    rewrite_header(f, edit)
    expect_failure("overlap", src, tmp_path / "out")


def test_byte_count_disagrees_with_shape(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)

    def edit(h):
        h["patch_embedding.bias"]["shape"] = [31]

    rewrite_header(shard(src / "transformer"), edit)
    expect_failure("needs 124 bytes but occupies 128", src, tmp_path / "out")


def test_unsupported_dtype(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)

    def edit(h):
        h["patch_embedding.bias"]["dtype"] = "C64"

    rewrite_header(shard(src / "transformer"), edit)
    expect_failure("unsupported dtype C64", src, tmp_path / "out")


def test_shard_named_in_index_is_missing(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    folder = src / "transformer"
    f = shard(folder)
    keys = json.loads(f.read_bytes()[8 : 8 + struct.unpack("<Q", f.read_bytes()[:8])[0]])
    keys.pop("__metadata__", None)
    index = {"weight_map": {k: (f.name if i % 2 else "diffusion_pytorch_model-00002-of-00002.safetensors") for i, k in enumerate(keys)}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    expect_failure("names shards that are missing: diffusion_pytorch_model-00002-of-00002.safetensors", src, tmp_path / "out")


def test_index_is_not_json(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    (src / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{ weight_map: ")
    expect_failure("not a valid safetensors index", src, tmp_path / "out")


def test_model_index_is_not_json(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    (src / "model_index.json").write_text("[1, 2")
    expect_failure("model_index.json is not valid JSON", src, tmp_path / "out")


def test_pipeline_of_another_family(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "HunyuanVideoPipeline"
    (src / "model_index.json").write_text(json.dumps(index))
    expect_failure("holds a HunyuanVideoPipeline pipeline", src, tmp_path / "out")


def test_missing_component_folder(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    shutil.rmtree(src / "text_encoder")
    expect_failure("no text encoder: SRC has no text_encoder/; pass --text-encoder", src, tmp_path / "out")


def test_duplicate_tensor_across_shards(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "transformer")
    shutil.copyfile(f, f.with_name("extra.safetensors"))
    expect_failure("appears in both", src, tmp_path / "out")


def test_pickle_with_forbidden_global(tiny, tmp_path):
    evil = tmp_path / "evil.pth"
    payload = b"\x80\x02cos\nsystem\nq\x00X\x05\x00\x00\x00touchq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    expect_failure(r"refusing to load .*os\.system", None, tmp_path / "out", **files_kw(tiny, text_encoder=evil))


def test_legacy_pickle_checkpoint_of_nothing_known(tiny, tmp_path):
    """The legacy (pre-zip) .pth format is read now; a file in it holding no known model is refused by its keys."""
    old = tmp_path / "old.pth"
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, old, _use_new_zipfile_serialization=False)
    message = expect_failure("looks like no model mlxvid knows", None, tmp_path / "out", **files_kw(tiny, text_encoder=old))
    assert "token_embedding.weight" in message


def test_truncated_pth(tiny, tmp_path):
    cut = tmp_path / "cut.pth"
    full = (tiny.official_folder() / "Wan2.1_VAE.pth").read_bytes()
    cut.write_bytes(full[: len(full) // 2])
    expect_failure("truncated or corrupt", None, tmp_path / "out", **files_kw(tiny, vae=cut))


def test_two_transformers_whose_names_do_not_say_which_is_which(tiny, tmp_path):
    folder = tmp_path / "loose"
    folder.mkdir()
    path, _ = tiny.comfy("bf16")
    shutil.copyfile(path, folder / "a.safetensors")
    shutil.copyfile(path, folder / "b.safetensors")
    expect_failure("do not say which is the high-noise expert", folder, tmp_path / "out", base="tiny-wan-a14b")


def test_tied_embedding_stored_twice_is_read_once(tiny, tmp_path):
    """transformers checkpoints may hold the tied token embedding as shared.weight and encoder.embed_tokens.weight."""
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "text_encoder")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    save_file(sd, str(f))
    convert_model(src, tmp_path / "out", dtype="fp32")
    te = mx.load(str(shard(tmp_path / "out" / "text_encoder")))
    np.testing.assert_array_equal(np.array(te["token_embedding.weight"]), sd["shared.weight"].numpy())


def test_unknown_keys_are_listed_and_refused(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "transformer")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    sd["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 32)
    sd["mystery"] = torch.zeros(3)
    save_file(sd, str(f))
    message = expect_failure("2 keys that mlxvid does not know", src, tmp_path / "out")
    assert "blocks.0.attn1.to_q.lora_A.weight" in message and "mystery" in message and "--allow-unknown-keys" in message
    convert_model(src, tmp_path / "out", dtype="fp32", allow_unknown_keys=True)
    assert (tmp_path / "out" / "mlxvid.json").is_file()


def test_missing_tensor(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "transformer")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    del sd["blocks.1.ffn.net.2.bias"]
    save_file(sd, str(f))
    expect_failure(r"lacks 1 tensor the model needs: blocks\.1\.ffn\.fc2\.bias", src, tmp_path / "out")


def test_config_disagrees_with_shapes(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    config = json.loads((src / "transformer" / "config.json").read_text())
    config["ffn_dim"] = 96
    (src / "transformer" / "config.json").write_text(json.dumps(config))
    message = expect_failure("has shape .* but the model expects", src, tmp_path / "out")
    assert "ffn 64" in message  # what the tensors themselves say


def test_checkpoint_of_another_size(tiny, tiny_registry, tmp_path):
    """A TI2V-5B-shaped transformer (header only, sparse) given as the A14B high-noise expert."""
    big = tmp_path / "wan2.2_ti2v_5B_fp16.safetensors"
    save_header_only(big, official_shapes(
        patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, text_dim=4096,
        freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6))  # fmt: skip
    message = expect_failure("the size of wan2.2-ti2v-5b", None, tmp_path / "out", **files_kw(tiny, base="wan2.2-t2v-a14b", transformer=big))
    assert "wan2.2-t2v-a14b has dim 5120" in message
    # without --base the registry model is recognised from the shapes, and the tiny text encoder then does not fit it
    expect_failure("produces 32-wide text embeddings but the transformer takes 4096", None, tmp_path / "out2",
                   **files_kw(tiny, base=None, transformer=big))


def test_checkpoint_of_an_unregistered_size(tiny, tmp_path):
    """A Wan 2.1 T2V-1.3B-shaped transformer: named as such."""
    small = tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors"
    save_header_only(small, official_shapes(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6))  # fmt: skip
    expect_failure("matches no registry model; it looks like Wan 2.1 T2V-1.3B", None, tmp_path / "out",
                   **files_kw(tiny, base=None, transformer=small))


def test_checkpoint_of_another_family(tiny, tmp_path):
    hunyuan = tmp_path / "hunyuan_video_t2v_720p_bf16.safetensors"
    save_file({"double_blocks.0.img_attn_qkv.weight": torch.zeros(6, 2),
               "txt_in.individual_token_refiner.blocks.0.norm1.weight": torch.zeros(2)}, str(hunyuan))  # fmt: skip
    expect_failure("should be a diffusion transformer for transformer, but it looks like a HunyuanVideo transformer", None,
                   tmp_path / "out", **files_kw(tiny, transformer=hunyuan))


def test_component_of_the_wrong_kind(tiny, tmp_path):
    te = tiny.official_folder() / "models_t5_umt5-xxl-enc-bf16.pth"
    expect_failure("should be a VAE for vae, but it looks like a UMT5 text encoder", None, tmp_path / "out", **files_kw(tiny, vae=te))


def test_t5_instead_of_umt5(tiny, tmp_path):
    sd = {k: v for k, v in tiny.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    del sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"]
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(t5))
    expect_failure("T5 v1.1 encoder", None, tmp_path / "out", **files_kw(tiny, text_encoder=t5))


def test_unsupported_comfy_quant_format(tiny, tmp_path):
    stored, _ = comfy_file(tiny.sd, "new")
    layer = "model.diffusion_model.blocks.0.ffn.0"
    # nvfp4, mxfp8 and int8_tensorwise are read (tests/test_convert_comfy_files.py); a format outside those is named
    stored[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "int4_w4a8"}).encode()), dtype=torch.uint8)
    path = tmp_path / "w4a8.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    message = expect_failure("quantized as 'int4_w4a8'", None, tmp_path / "out", **files_kw(tiny, transformer=path))
    assert "nvfp4" in message  # the formats it does read are listed


def test_fp8_scale_of_the_wrong_shape(tiny, tmp_path):
    stored, _ = comfy_file(tiny.sd, "legacy")
    stored["model.diffusion_model.blocks.0.ffn.0.scale_weight"] = torch.ones(3)
    path = tmp_path / "badscale.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    expect_failure("fits neither one scale per tensor", None, tmp_path / "out", **files_kw(tiny, transformer=path))


def test_orphan_scale_is_an_unknown_key(tiny, tmp_path):
    stored, _ = comfy_file(tiny.sd, "legacy")
    stored["model.diffusion_model.blocks.0.ffn.7.scale_weight"] = torch.tensor(1.0)
    path = tmp_path / "orphan.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    expect_failure(r"1 key that mlxvid does not know: blocks\.0\.ffn\.7\.scale_weight", None, tmp_path / "out",
                   **files_kw(tiny, transformer=path))


def test_second_expert_for_a_one_expert_model(tiny, tiny_registry, tmp_path):
    expect_failure("has one transformer, but a second one was given", None, tmp_path / "out",
                   **files_kw(tiny, transformer_2=tiny.comfy("bf16")[0]))


def test_missing_tokenizer(tiny, tiny_registry, tmp_path):
    expect_failure("no tokenizer: pass --tokenizer", None, tmp_path / "out", **files_kw(tiny, tokenizer=None))


def test_bad_options(tiny, tmp_path):
    expect_failure("--group-size must be one of 32, 64, 128", tiny.diffusers_folder(), tmp_path / "out", quantize="q4", group_size=48)
    expect_failure("--quantize must be one of", tiny.diffusers_folder(), tmp_path / "out", quantize="int3")
    expect_failure("--dtype must be one of", tiny.diffusers_folder(), tmp_path / "out", dtype="fp8")


def test_cli_reports_errors_without_traceback(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path / "out"), "--transformer", str(tmp_path / "missing.safetensors")])
    assert info.value.code == 1
    assert "error: --transformer: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "c"])
    assert "convert takes [SRC] DST" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# failures while writing, interruption and resumption


def test_non_finite_weights_fail_while_writing_and_leave_a_resumable_part(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    f = shard(src / "text_encoder")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    sd["encoder.final_layer_norm.weight"][3] = float("nan")
    save_file(sd, str(f))
    dst = tmp_path / "out"
    with pytest.raises(MlxVideoError, match="contains NaN or infinite values"):
        convert_model(src, dst, dtype="fp32")
    part = dst.with_name("out.part")
    assert not dst.exists() and part.is_dir() and not (part / "mlxvid.json").exists()
    assert not list(part.rglob("*.tmp"))
    assert list((part / "transformer").glob("model-*.safetensors"))  # the transformer was done before the failure


def test_interrupted_conversion_resumes_without_redoing_complete_shards(tiny, tmp_path):
    src = tiny.diffusers_folder()
    dst = tmp_path / "out"
    seen = []

    def interrupt(component, done, total):
        seen.append(done)
        if done == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_model(src, dst, dtype="fp32", shard_bytes=8192, progress=interrupt)
    part = tmp_path / "out.part"
    assert not dst.exists() and part.is_dir() and not (part / "mlxvid.json").exists()
    assert not list(part.rglob("*.tmp"))
    before = {p: p.stat().st_mtime_ns for p in part.rglob("model-*.safetensors")}
    assert len(before) >= 3

    logs = []
    convert_model(src, dst, dtype="fp32", shard_bytes=8192, log=logs.append)
    assert any("resuming" in line for line in logs)
    for p, mtime in before.items():
        again = dst / p.relative_to(part)
        assert again.stat().st_mtime_ns == mtime, f"{again} was rewritten"
    # the same folder as an uninterrupted conversion
    fresh = tmp_path / "fresh"
    convert_model(src, fresh, dtype="fp32", shard_bytes=8192)
    for f in fresh.rglob("*.safetensors"):
        a, b = mx.load(str(f)), mx.load(str(dst / f.relative_to(fresh)))
        assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert not part.exists()


def test_part_from_other_settings_is_discarded(tiny, tmp_path):
    src = tiny.diffusers_folder()
    dst = tmp_path / "out"

    def interrupt(component, done, total):
        if done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_model(src, dst, dtype="fp32", shard_bytes=8192, progress=interrupt)
    logs = []
    convert_model(src, dst, dtype="bf16", shard_bytes=8192, log=logs.append)
    assert not any("resuming" in line for line in logs)
    w = mx.load(str(next((dst / "transformer").glob("model-*.safetensors"))))
    assert all(v.dtype == mx.bfloat16 for v in w.values())


def test_failure_before_writing_keeps_an_earlier_part(tiny, tmp_path):
    """A re-run that fails in planning must not destroy the resumable work of an earlier run."""
    src = copy_diffusers(tiny, tmp_path)
    dst = tmp_path / "out"

    def interrupt(component, done, total):
        if done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_model(src, dst, dtype="fp32", shard_bytes=8192, progress=interrupt)
    shutil.rmtree(src / "tokenizer")
    (src / "tokenizer").mkdir()
    with pytest.raises(MlxVideoError, match="neither spiece.model nor tokenizer.json"):
        convert_model(src, dst, dtype="fp32", shard_bytes=8192)
    assert not dst.exists() and (tmp_path / "out.part").is_dir()


def test_overwrite_replaces_only_at_the_end(tiny, tmp_path):
    dst = tmp_path / "out"
    convert_model(tiny.diffusers_folder(), dst, dtype="fp32")
    stale = dst / "stale.txt"
    stale.write_text("old")
    convert_model(tiny.diffusers_folder(), dst, dtype="fp16", overwrite=True)
    assert not stale.exists() and json.loads((dst / "mlxvid.json").read_text())["dtype"] == "float16"


def test_overwrite_that_fails_at_the_rename_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
    import mlx_video.convert.convert as conv

    dst = tmp_path / "out"
    convert_model(tiny.diffusers_folder(), dst, dtype="fp32")
    real_replace = os.replace

    def failing_replace(a, b):
        if Path(a).name == "out.part":
            raise OSError(28, "No space left on device", str(b))
        return real_replace(a, b)

    monkeypatch.setattr(conv.os, "replace", failing_replace)
    with pytest.raises(MlxVideoError, match="No space left on device"):
        convert_model(tiny.diffusers_folder(), dst, dtype="fp16", overwrite=True)
    assert json.loads((dst / "mlxvid.json").read_text())["dtype"] == "float32"  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.part"]


def test_shards_are_written_slice_by_slice(tiny, tmp_path, monkeypatch):
    """With a tiny slice size every tensor is written in several pieces; the result is unchanged."""
    import mlx_video.convert.quantize as q

    reference = tmp_path / "whole"
    convert_model(tiny.diffusers_folder(), reference, dtype="bf16")
    monkeypatch.setattr(q, "CHUNK_BYTES", 256)
    sliced = tmp_path / "sliced"
    convert_model(tiny.diffusers_folder(), sliced, dtype="bf16")
    for f in reference.rglob("*.safetensors"):
        assert f.read_bytes() == (sliced / f.relative_to(reference)).read_bytes()


# ---------------------------------------------------------------------------------------------------
# DST.part, locks, full disks and unreadable sources (issue 24: findings 3, 4, 5, 7, 13, 19)


def interrupted_at(done_at: int):
    def interrupt(component, done, total):
        if done == done_at:
            raise KeyboardInterrupt

    return interrupt


def test_part_folder_of_someone_else_is_never_deleted(tiny, tmp_path):
    dst = tmp_path / "out"
    part = tmp_path / "out.part"
    part.mkdir()
    (part / "thesis.txt").write_text("four years of work")
    with pytest.raises(MlxVideoError, match="no mlxvid conversion recorded"):
        convert_model(tiny.diffusers_folder(), dst, dtype="fp32")
    assert (part / "thesis.txt").read_text() == "four years of work" and not dst.exists()


def test_part_of_other_settings_loses_only_our_files(tiny, tmp_path):
    src = tiny.diffusers_folder()
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_model(src, dst, dtype="fp32", shard_bytes=8192, progress=interrupted_at(10))
    notes = tmp_path / "out.part" / "transformer" / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(MlxVideoError, match=r"files it did not write \(transformer/notes.txt\)"):
        convert_model(src, dst, dtype="bf16", shard_bytes=8192)
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "out.part").rglob("*")) == ["notes.txt", "transformer"]
    notes.unlink()
    convert_model(src, dst, dtype="bf16", shard_bytes=8192)
    assert (dst / "mlxvid.json").is_file()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_part_that_is_not_a_folder_is_refused(tiny, tmp_path, kind):
    user = tmp_path / "user"
    user.mkdir()
    (user / "photo.png").write_bytes(b"png")
    part = tmp_path / "out.part"
    if kind == "file":
        part.write_text("not ours")
    else:
        part.symlink_to(user)
    with pytest.raises(MlxVideoError, match=f"is not a folder of an interrupted conversion .it is a {kind}"):
        convert_model(tiny.diffusers_folder(), tmp_path / "out", dtype="fp32")
    assert (user / "photo.png").read_bytes() == b"png"
    assert part.is_symlink() if kind == "symlink" else part.read_text() == "not ours"


def test_second_conversion_to_the_same_destination_is_refused_while_the_first_runs(tiny, tmp_path):
    src = tiny.diffusers_folder()
    dst = tmp_path / "out"
    second: list[str] = []

    def start_another(component, done, total):
        if done == 10 and not second:
            with pytest.raises(MlxVideoError, match="another `mlxvid convert` is writing") as info:
                convert_model(src, dst, dtype="fp32", shard_bytes=8192)
            second.append(str(info.value))

    convert_model(src, dst, dtype="fp32", shard_bytes=8192, progress=start_another)
    assert second and (dst / "mlxvid.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file is gone too


def test_too_little_free_space_is_refused_before_writing(tiny, tmp_path, monkeypatch):
    import mlx_video.convert.part as part

    from types import SimpleNamespace

    monkeypatch.setattr(part.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    expect_failure("not enough free space", tiny.diffusers_folder(), tmp_path / "out", dtype="fp32")


def test_disk_full_while_writing_is_a_message_and_the_part_resumes(tiny, tmp_path, monkeypatch):
    import errno

    from mlx_video.convert.shards import ShardWriter

    real_write = ShardWriter.write
    calls = []

    def full_disk(self, name, offset, data):
        calls.append(name)
        if len(calls) == 30:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
        return real_write(self, name, offset, data)

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    src, dst = tiny.diffusers_folder(), tmp_path / "out"
    with pytest.raises(MlxVideoError, match="No space left on device.*re-run the same command to resume"):
        convert_model(src, dst, dtype="fp32", shard_bytes=8192)
    part = tmp_path / "out.part"
    assert not dst.exists() and part.is_dir() and not list(part.rglob("*.tmp"))
    monkeypatch.setattr(ShardWriter, "write", real_write)
    logs = []
    convert_model(src, dst, dtype="fp32", shard_bytes=8192, log=logs.append)
    assert any("resuming" in line for line in logs) and (dst / "mlxvid.json").is_file()


def test_component_folder_that_is_a_symlink_loop_is_an_error(tiny, tmp_path):
    src = copy_diffusers(tiny, tmp_path)
    shutil.rmtree(src / "vae")
    (src / "vae").symlink_to("vae")
    expect_failure("cannot read .*vae .*symlink loop", src, tmp_path / "out", dtype="fp32")


def test_component_option_that_is_a_symlink_loop_says_so(tiny, tmp_path):
    loop = tmp_path / "vae.safetensors"
    loop.symlink_to(loop.name)
    expect_failure("cannot be read .a broken symlink or a symlink loop", None, tmp_path / "out", **files_kw(tiny, vae=loop))


def test_destination_that_cannot_be_made_is_refused_before_work(tiny, tmp_path, monkeypatch):
    import mlx_video.convert.convert as conv

    monkeypatch.setattr(conv, "plan", lambda *a, **k: pytest.fail("planned before checking the destination"))
    blocker = tmp_path / "a-file"
    blocker.write_text("the user's")
    with pytest.raises(MlxVideoError, match="a-file is not a folder"):
        convert_model(tiny.diffusers_folder(), blocker / "out", dtype="fp32")
    assert blocker.read_text() == "the user's"


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root may write into any folder, so a read-only folder cannot be made here")
def test_read_only_destination_folder_is_refused_before_work(tiny, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(MlxVideoError, match="is not writable"):
            convert_model(tiny.diffusers_folder(), folder / "out", dtype="fp32")
    finally:
        folder.chmod(0o700)
