"""Every checkpoint layout and precision `mlxvid convert` reads, checked against a reference.

Tiny random reference checkpoints are written here in each format from one tiny diffusers
`WanTransformer3DModel` (plus a tiny UMT5 encoder and Wan 2.1-style VAE): the diffusers layout, the official
release layout (sharded experts with a WanModel config, torch.save'd .pth files for the T5 and the VAE, the
google/umt5-xxl tokenizer folder), ComfyUI single files in bf16, ComfyUI fp8 "scaled" files (legacy
`scaled_fp8` + `scale_weight`/`scale_input`, and the newer `weight_scale` + `comfy_quant`), and plain fp8
casts (e4m3fn and e5m2, no scales). fp8 files are made the way ComfyUI makes them: `encode_e4m3fn`-equivalent
torch casts of W / s with s = max|W| / 448 per tensor.

Each converted transformer must give the output of the reference model whose weights were dequantized the
same way: within fp32 rounding (1e-5) for every format, bit-identical between fp8 storage (--quantize fp8,
decoded when a layer runs) and the same weights dequantized at conversion, and within the documented bounds
for q8/q4 (QUANT_BOUNDS: the error against the unquantized model; against the model whose weights are the
dequantized q8/q4 weights it is again fp32 rounding).
"""

from __future__ import annotations

import json
import re
import struct

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from support.wan_checkpoints import Tiny, official_vae21, scaled_fp8  # noqa: E402
from support.tensor_files import converted_weights  # noqa: E402
from support.arrays import rel_err  # noqa: E402

# Relative output error against the unquantized model, measured on this tiny model with group size 32: q8 gives
# 8.8e-4, q4 1.6e-2. The bounds leave a margin of about 5x.
QUANT_BOUNDS = {"q8": 5e-3, "q4": 8e-2}


# ---------------------------------------------------------------------------------------------------
# renaming diffusers state dicts to the official names (huggingface/diffusers scripts/convert_wan_to_diffusers.py, inverted)


# ---------------------------------------------------------------------------------------------------
# fp8 the way ComfyUI stores it


# ---------------------------------------------------------------------------------------------------
# the tiny models and their files


def convert(*args):
    main(["convert", *map(str, args)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = Tiny(tmp_path_factory.mktemp("formats"))
    t.official_folder()
    return t


@pytest.fixture(scope="module")
def from_diffusers(tiny):
    out = tiny.root / "mlx_diffusers"
    convert(tiny.diffusers_folder(), out, "--dtype", "fp32")
    return out


# ---------------------------------------------------------------------------------------------------


def test_diffusers_layout_matches_reference(tiny, from_diffusers):
    ref = tiny.reference()
    err = rel_err(tiny.ours(from_diffusers), ref)
    assert err < 1e-5, err
    manifest = json.loads((from_diffusers / "mlxvid.json").read_text())
    assert manifest["source"]["format"] == "diffusers" and manifest["quantization"] is None


def test_official_layout_gives_the_diffusers_conversion(tiny, from_diffusers, capsys):
    out = tiny.root / "mlx_official"
    convert(tiny.official_folder(), out, "--dtype", "fp32")
    log = capsys.readouterr().out
    assert "official Wan release layout" in log
    manifest = json.loads((out / "mlxvid.json").read_text())
    assert manifest["model"] == "wan2.2-t2v-a14b" and manifest["defaults"]["boundary"] == 0.875
    assert set(manifest["components"]) == {"transformer", "transformer_2", "text_encoder", "vae", "tokenizer"}
    # the same weights as the diffusers conversion, tensor for tensor: transformer, T5 (.pth) and VAE (.pth)
    for component in ("transformer", "text_encoder", "vae"):
        ours, want = converted_weights(out, component), converted_weights(from_diffusers, component)
        assert ours.keys() == want.keys(), component
        for k in want:
            np.testing.assert_array_equal(ours[k], want[k], err_msg=f"{component} {k}")
        assert json.loads((out / component / "config.json").read_text()) == json.loads(
            (from_diffusers / component / "config.json").read_text()
        ), component
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(dict(tiny.transformer_2.state_dict()))) < 1e-5
    assert (out / "tokenizer" / "spiece.model").read_bytes() == tiny.spiece.read_bytes()


@pytest.mark.parametrize("kind", ["bf16", "legacy", "new", "e4m3fn", "e5m2"])
def test_single_files_match_dequantized_reference(tiny, tiny_registry, kind, capsys):
    """ComfyUI bf16 and fp8-scaled files (legacy and new), and plain fp8 casts: dequantized at conversion, and
    kept as fp8 codes (--quantize fp8), both give the reference whose weights were dequantized the same way;
    the two conversions agree bit for bit."""
    path, reference = tiny.comfy(kind)
    official = tiny.official_folder()
    common = ["--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
              "--vae", official / "Wan2.1_VAE.pth", "--tokenizer", official / "google" / "umt5-xxl", "--dtype", "fp32"]
    plain = tiny.root / f"mlx_{kind}"
    convert(plain, *common)
    log = capsys.readouterr().out
    assert "prefix 'model.diffusion_model.' removed" in log
    expected_scheme = {"bf16": "bf16", "legacy": "legacy: scaled_fp8", "new": "comfy_quant", "e4m3fn": "plain fp8 cast",
                       "e5m2": "plain fp8 cast"}[kind]
    assert expected_scheme in log
    ref = tiny.reference(reference)
    ours = tiny.ours(plain)
    assert rel_err(ours, ref) < 1e-5
    if kind == "bf16":
        return
    stored = tiny.root / f"mlx_{kind}_fp8"
    convert(stored, *common, "--quantize", "fp8")
    record = json.loads((stored / "transformer" / "quantization.json").read_text())
    assert record["mode"] == "fp8" and len(record["layers"]) == 2 * 10
    fmt = "e5m2" if kind == "e5m2" else "e4m3fn"
    assert set(record["layers"].values()) == {fmt}
    # the codes are the file's, byte for byte
    weights = converted_weights(stored, "transformer")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        codes = f.get_tensor("model.diffusion_model.blocks.1.ffn.2.weight").view(torch.uint8).numpy()
    np.testing.assert_array_equal(weights["blocks.1.ffn.fc2.weight"], codes)
    np.testing.assert_array_equal(tiny.ours(stored), ours)


def test_fp8_storage_from_float_weights(tiny, tiny_registry):
    """--quantize fp8 of a bf16 checkpoint: codes of W / s with s = max|W| / 448, as ComfyUI encodes."""
    path, reference = tiny.comfy("bf16")
    official = tiny.official_folder()
    out = tiny.root / "mlx_bf16_to_fp8"
    convert(out, "--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
            "--tokenizer", official / "google" / "umt5-xxl", "--dtype", "fp32", "--quantize", "fp8")
    weights = converted_weights(out, "transformer")
    dequantized = dict(reference)
    for key in reference:
        if re.fullmatch(r"blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ffn\.net\.(0\.proj|2))\.weight", key):
            codes, scale, deq = scaled_fp8(reference[key])
            target = key.replace("attn1.to_out.0", "self_attn.o").replace("attn2.to_out.0", "cross_attn.o")
            target = re.sub(r"attn1\.to_", "self_attn.", re.sub(r"attn2\.to_", "cross_attn.", target))
            target = target.replace("ffn.net.0.proj", "ffn.fc1").replace("ffn.net.2", "ffn.fc2")
            np.testing.assert_array_equal(weights[target], codes.view(torch.uint8).numpy())
            assert weights[target[: -len("weight")] + "weight_scale"] == scale.item()
            dequantized[key] = deq
    assert rel_err(tiny.ours(out), tiny.reference(dequantized)) < 1e-5
    assert not (out / "vae").exists()  # a folder without a VAE: latents only


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_affine_quantization_within_bounds(tiny, tiny_registry, mode):
    path, reference = tiny.comfy("bf16")
    official = tiny.official_folder()
    out = tiny.root / f"mlx_{mode}"
    convert(out, "--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
            "--tokenizer", official / "google" / "umt5-xxl", "--dtype", "fp32", "--quantize", mode, "--group-size", "32")
    record = json.loads((out / "transformer" / "quantization.json").read_text())
    bits = {"q8": 8, "q4": 4}[mode]
    assert record == {"mode": "affine", "bits": bits, "group_size": 32, "layers": record["layers"]} and len(record["layers"]) == 20
    weights = {k: mx.array(v) for k, v in converted_weights(out, "transformer").items()}
    # the reference with the dequantized weights: fp32 rounding apart, the same output
    dequantized = dict(reference)
    names = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
             "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
             "cross_attn.o": "attn2.to_out.0", "ffn.fc1": "ffn.net.0.proj", "ffn.fc2": "ffn.net.2"}
    for layer in record["layers"]:
        n, rest = re.fullmatch(r"blocks\.(\d+)\.(.*)", layer).groups()
        w = mx.dequantize(weights[f"{layer}.weight"], weights[f"{layer}.scales"], weights[f"{layer}.biases"], group_size=32, bits=bits)
        dequantized[f"blocks.{n}.{names[rest]}.weight"] = torch.from_numpy(np.array(w))
    ours = tiny.ours(out)
    assert rel_err(ours, tiny.reference(dequantized)) < 1e-4
    err = rel_err(ours, tiny.reference(reference))
    print(f"{mode}: relative error against the unquantized model {err:.2e}")
    assert err < QUANT_BOUNDS[mode]
    assert weights["blocks.0.self_attn.q.weight"].dtype == mx.uint32
    assert weights["head.linear.weight"].dtype == mx.float32  # the head stays in --dtype


def test_two_experts_and_comfy_text_encoder_and_vae(tiny, tiny_registry, capsys):
    """An A14B-style model from ComfyUI files only: both experts fp8-scaled, a UMT5 file in transformers names
    stored as scaled fp8 with its SentencePiece model embedded, and a bf16 VAE safetensors in official names."""
    high, ref_high = tiny.comfy("legacy")
    low, ref_low = tiny.comfy("legacy", model="transformer_2")
    te = {k: v for k, v in tiny.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    stored = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "spiece_model": torch.frombuffer(bytearray(tiny.spiece.read_bytes()), dtype=torch.uint8)}
    expected_te = {}
    for k, w in te.items():
        if re.search(r"(SelfAttention\.[qkvo]|DenseReluDense\.w[io](_[01])?)\.weight$", k):
            codes, scale, deq = scaled_fp8(w)
            stored[k], stored[k[: -len("weight")] + "scale_weight"] = codes, scale
            expected_te[k] = deq
        else:
            stored[k] = w.to(torch.float16)
            expected_te[k] = stored[k].float()
    te_path = tiny.root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(te_path))
    vae_path = tiny.root / "wan_2.1_vae.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in official_vae21(tiny.vae.state_dict(), 1).items()}, str(vae_path))

    out = tiny.root / "mlx_comfy_a14b"
    convert(out, "--base", "tiny-wan-a14b", "--transformer", high, "--transformer-2", low, "--text-encoder", te_path,
            "--vae", vae_path, "--dtype", "fp32")
    log = capsys.readouterr().out
    assert "tokenizer: the SentencePiece model embedded" in log
    assert (out / "tokenizer" / "spiece.model").read_bytes() == tiny.spiece.read_bytes()
    assert rel_err(tiny.ours(out), tiny.reference(ref_high)) < 1e-5
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(ref_low)) < 1e-5
    te_ours = converted_weights(out, "text_encoder")
    np.testing.assert_array_equal(te_ours["blocks.1.ffn.fc2.weight"], expected_te["encoder.block.1.layer.1.DenseReluDense.wo.weight"].numpy())
    np.testing.assert_array_equal(te_ours["token_embedding.weight"], expected_te["shared.weight"].numpy())
    vae_ours = converted_weights(out, "vae")
    np.testing.assert_array_equal(
        vae_ours["decoder.up.1.resnets.0.shortcut.weight"],
        tiny.vae.state_dict()["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].to(torch.bfloat16).float().permute(0, 2, 3, 4, 1).numpy(),
    )
    manifest = json.loads((out / "mlxvid.json").read_text())
    assert manifest["model"] == "tiny-wan-a14b" and manifest["defaults"]["boundary"] == 0.875 and manifest["vae_stride"] == [4, 8, 8]


def test_folder_of_single_files_is_classified_by_keys(tiny, tiny_registry, capsys):
    """A folder of loose files: which is the transformer, the text encoder and the VAE is read from the keys."""
    folder = tiny.root / "loose"
    folder.mkdir()
    path, reference = tiny.comfy("new")
    (folder / "diffusion_model.safetensors").write_bytes(path.read_bytes())
    official = tiny.official_folder()
    (folder / "text_encoder.pth").write_bytes((official / "models_t5_umt5-xxl-enc-bf16.pth").read_bytes())
    (folder / "vae.pth").write_bytes((official / "Wan2.1_VAE.pth").read_bytes())
    (folder / "spiece.model").write_bytes(tiny.spiece.read_bytes())
    out = tiny.root / "mlx_loose"
    convert(folder, out, "--base", "tiny-wan", "--dtype", "fp32")
    assert "single-file checkpoints" in capsys.readouterr().out
    assert rel_err(tiny.ours(out), tiny.reference(reference)) < 1e-5
    assert set(json.loads((out / "mlxvid.json").read_text())["components"]) == {"transformer", "text_encoder", "vae", "tokenizer"}


@pytest.mark.parametrize("mode", ["q4", "fp8"])
def test_quantized_folder_runs_in_the_pipeline(tiny, tiny_registry, mode):
    """The pipeline loads quantized folders through ModelFolder.load_module and denoises without NaN."""
    from mlx_video.families.wan.pipeline import WanPipeline, WanSettings

    path, _ = tiny.comfy("bf16")
    official = tiny.official_folder()
    out = tiny.root / f"mlx_pipeline_{mode}"
    convert(out, "--base", "tiny-wan", "--transformer", path, "--text-encoder", official / "models_t5_umt5-xxl-enc-bf16.pth",
            "--tokenizer", official / "google" / "umt5-xxl", "--quantize", mode, "--group-size", "32")
    pipe = WanPipeline.from_pretrained(str(out))
    result = pipe.generate(WanSettings(prompt="a cat", width=32, height=32, frames=5, steps=2, seed=1))
    assert np.isfinite(result.latents).all() and result.latents.shape == (1, 16, 2, 4, 4)


def test_header_written_by_the_streaming_writer_reads_everywhere(tiny, from_diffusers):
    """Our hand-written shards: 8-byte aligned header, readable by safetensors, MLX and our strict reader."""
    from safetensors.numpy import load_file

    from mlx_video.io.safetensors import SafetensorsFile

    shard = next((from_diffusers / "transformer").glob("model-*.safetensors"))
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    assert (8 + n) % 8 == 0
    a, b = load_file(str(shard)), mx.load(str(shard))
    assert a.keys() == b.keys() == set(SafetensorsFile(shard).keys())


def test_official_single_model_layout(tiny, from_diffusers):
    """TI2V-5B's release layout: the model shards and their WanModel config.json at the top of the folder."""
    import shutil

    official = tiny.official_folder()
    root = tiny.root / "official_5b"
    shutil.copytree(official / "high_noise_model", root)
    shutil.copytree(official / "google", root / "google")
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        shutil.copyfile(official / name, root / name)
    out = tiny.root / "mlx_official_5b"
    convert(root, out, "--dtype", "fp32")
    manifest = json.loads((out / "mlxvid.json").read_text())
    assert manifest["model"] == "wan2.2-ti2v-5b" and manifest["defaults"]["boundary"] is None and manifest["defaults"]["per_frame_timesteps"]
    ours, want = converted_weights(out, "transformer"), converted_weights(from_diffusers, "transformer")
    assert ours.keys() == want.keys() and all(np.array_equal(ours[k], want[k]) for k in want)


def test_folder_of_comfy_files_with_two_experts(tiny, tiny_registry):
    """ComfyUI's file names say which expert is which."""
    import shutil

    folder = tiny.root / "loose_a14b"
    (folder / "google").mkdir(parents=True)
    high, ref_high = tiny.comfy("legacy")
    low, ref_low = tiny.comfy("e4m3fn", model="transformer_2")
    shutil.copyfile(high, folder / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    shutil.copyfile(low, folder / "wan2.2_t2v_low_noise_14B_fp8_e4m3fn.safetensors")
    official = tiny.official_folder()
    shutil.copyfile(official / "models_t5_umt5-xxl-enc-bf16.pth", folder / "umt5.pth")
    shutil.copytree(official / "google" / "umt5-xxl", folder / "google" / "umt5-xxl")
    out = tiny.root / "mlx_loose_a14b"
    convert(folder, out, "--base", "tiny-wan-a14b", "--dtype", "fp32")
    assert rel_err(tiny.ours(out), tiny.reference(ref_high)) < 1e-5
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(ref_low)) < 1e-5


def test_component_file_replaces_a_folder_component(tiny, capsys):
    """The official layout with its high-noise expert replaced by a ComfyUI fp8 file (no config.json: its head
    count comes from the other expert's)."""
    path, reference = tiny.comfy("new")
    out = tiny.root / "mlx_official_replaced"
    convert(tiny.official_folder(), out, "--transformer", path, "--dtype", "fp32", "--quantize", "fp8")
    assert "official Wan release layout + --transformer" in capsys.readouterr().out
    assert rel_err(tiny.ours(out), tiny.reference(reference)) < 1e-5  # the file's fp8 codes, kept
    # the low-noise expert came in fp32 and was encoded to fp8 here: close to its reference, not equal
    assert rel_err(tiny.ours(out, "transformer_2"), tiny.reference(dict(tiny.transformer_2.state_dict()))) < 2e-2


def test_quantized_text_encoder_stays_close(a14b):
    """q8 applies to UMT5's linear layers too; its embeddings stay within a small bound of the fp32 ones."""
    from mlx_video.cli import main as cli_main
    from mlx_video.families.wan.pipeline import WanPipeline

    root, _ = a14b
    out = root / "mlx_q8"
    if not out.exists():
        cli_main(["convert", str(root / "diffusers"), str(out), "--dtype", "fp32", "--quantize", "q8", "--group-size", "32"])
    quant = json.loads((out / "text_encoder" / "quantization.json").read_text())
    assert quant, "no text-encoder layer was quantized"
    prompts = ["a corgi surfs a wave at sunset", "static, blurry"]
    want = np.array(WanPipeline.from_pretrained(str(root / "mlx")).encode_text(prompts))
    got = np.array(WanPipeline.from_pretrained(str(out)).encode_text(prompts))
    err = rel_err(got, want)
    bf16 = root / "mlx_bf16"
    if not bf16.exists():
        cli_main(["convert", str(root / "diffusers"), str(bf16), "--dtype", "bf16"])
    bf16_err = rel_err(np.array(WanPipeline.from_pretrained(str(bf16)).encode_text(prompts).astype(mx.float32)), want)
    print(f"text encoder: q8 relative error {err:.2e}, bf16 {bf16_err:.2e}")
    # T5 attention has no 1/sqrt(d) scaling, so this random tiny model is sensitive to any rounding: q8 is judged
    # against what plain bf16 storage of the same weights costs (measured: q8 2.9e-2, bf16 2.3e-2).
    assert 0 < err < 2 * bf16_err


def test_official_layout_with_legacy_format_vae(tiny, from_diffusers, capsys):
    """The official Wan2.1_VAE.pth / Wan2.2_VAE.pth may be in torch.save's legacy (pre-1.6, non-zip) format: such a
    folder converts to the same VAE, read without torch and without unpickling anything but tensor records."""
    import shutil

    root = tiny.root / "official_legacy_vae"
    if not root.exists():
        shutil.copytree(tiny.official_folder(), root)
    vae = root / "Wan2.1_VAE.pth"
    torch.save(official_vae21(tiny.vae.state_dict(), 1), vae, _use_new_zipfile_serialization=False)
    assert not vae.read_bytes().startswith(b"PK")
    out = tiny.root / "mlx_official_legacy_vae"
    convert(root, out, "--dtype", "fp32")
    assert "official Wan release layout" in capsys.readouterr().out
    ours, want = converted_weights(out, "vae"), converted_weights(from_diffusers, "vae")
    assert ours.keys() == want.keys() and ours
    for k in want:
        np.testing.assert_array_equal(ours[k], want[k], err_msg=f"vae {k}")
    assert json.loads((out / "vae" / "config.json").read_text()) == json.loads((from_diffusers / "vae" / "config.json").read_text())
