"""GGUF checkpoints through `mlxvid convert` and `mlxvid generate`.

A tiny random Wan pipeline (diffusers) has its transformer written as GGUF the way ComfyUI-GGUF / QuantStack
write Wan files (official names, arch `wan`; 1-D, small and modulation tensors F32, the 5-D patch embedding F32
with all its dims, embeddings and head unquantized, block linears quantized, K-quants falling back to F16 for
rows that are not a multiple of 256). The converted folder must generate the latents of the diffusers pipeline
whose transformer holds the same dequantized weights (dequantized by the `gguf` package, the independent
reference), and the layers kept quantized (MLX affine, exact) must give the latents of a conversion of the
dequantized weights. Full-size files of the real naming are planned from their headers alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from support.wan_checkpoints import official_transformer_name  # noqa: E402
from support.wan import build_tiny_wan_pipeline, use_official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset"
NEGATIVE = "static, blurry"
WIDTH, HEIGHT, FRAMES, STEPS = 48, 32, 5, 2  # latent 2 x 4 x 6
NEVER_QUANTIZED = ("modulation", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.", "img_emb.", "head.")


# ---------------------------------------------------------------------------------------------------
# K-quant encoders (gguf-py only decodes K-quants); any valid encoding will do, the reference decodes it


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q4_K blocks (rows, cols / 256 * 144): 8 groups of 32 with 6-bit scales and mins."""
    g = x.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(g.min(-1), 0.0)
    scale = (g.max(-1) - lo) / 15
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (-lo.min(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.round(scale / np.maximum(d.astype(np.float32), 1e-30)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / np.maximum(dmin.astype(np.float32), 1e-30)), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    q = np.clip(np.round((g + (dmin.astype(np.float32) * mn)[..., None]) / np.where(step > 0, step, 1)), 0, 15).astype(np.uint8)
    s = np.zeros((g.shape[0], 12), np.uint8)
    s[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: group 2c low nibbles, 2c + 1 high
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), s, qs], axis=1)
    return blocks.reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q6_K blocks (rows, cols / 256 * 210): 16 groups of 16 with int8 scales."""
    g = x.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(g).max(-1) / 31
    d = (scale.max(-1, keepdims=True) / 127).astype(np.float16)
    sc = np.clip(np.round(scale / np.maximum(d.astype(np.float32), 1e-30)), -128, 127).astype(np.int8)
    step = (d.astype(np.float32) * sc)[..., None]
    u = (np.clip(np.round(g / np.where(step != 0, step, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = u & 15, u >> 4  # [block, half, quarter, l]
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return blocks.reshape(x.shape[0], -1)


def encode(x: np.ndarray, tname: str) -> np.ndarray:
    if tname == "Q4_K":
        return quantize_q4_k(x)
    if tname == "Q6_K":
        return quantize_q6_k(x)
    return gguf.quants.quantize(x, getattr(Q, tname))


# ---------------------------------------------------------------------------------------------------
# Wan transformers as ComfyUI-GGUF writes them


def storage_type(name: str, shape: tuple[int, ...], wanted: str) -> str:
    """ComfyUI-GGUF's choice for a Wan tensor given the quantization asked for (city96/ComfyUI-GGUF tools/convert.py)."""
    numel = int(np.prod(shape))
    if len(shape) != 2 or numel <= 1024 or ".modulation" in name or name.endswith("modulation"):
        return "F32"
    if any(s in name for s in NEVER_QUANTIZED):
        return "F16"
    if shape[1] % (256 if wanted.endswith("_K") else 32):
        return "F16"  # the row does not fill whole blocks
    return wanted


def write_wan_gguf(path: Path, official: dict[str, np.ndarray], choose) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Write `official` (name -> float32) as a Wan GGUF; `choose(name)` is the quantization asked for each block
    linear. Returns (the dequantized values the file holds, by name; the stored type of each)."""
    w = gguf.GGUFWriter(str(path), arch="wan")
    values, types = {}, {}
    for name, x in official.items():
        tname = storage_type(name, x.shape, choose(name))
        types[name] = tname
        if tname == "F32":
            w.add_tensor(name, x.astype(np.float32))
            values[name] = x.astype(np.float32)
        elif tname == "F16":
            w.add_tensor(name, x.astype(np.float16))
            values[name] = x.astype(np.float16).astype(np.float32)
        else:
            blocks = encode(x, tname)
            w.add_tensor(name, blocks, raw_dtype=getattr(Q, tname))
            values[name] = gguf.quants.dequantize(blocks, getattr(Q, tname)).reshape(x.shape)
            assert rel_err(values[name], x) < 0.2, (name, tname)  # the encoder is sound
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values, types


MIXED = [  # (pattern, type): a mixed file like the Q4_K_M / Q5_K_M mixes, plus the legacy types
    (r"blocks\.0\.self_attn\.[qk]\.", "Q8_0"), (r"blocks\.0\.self_attn\.[vo]\.", "Q4_0"), (r"blocks\.0\.cross_attn\.[qk]\.", "Q5_0"),
    (r"blocks\.0\.cross_attn\.[vo]\.", "Q4_1"), (r"blocks\.0\.ffn\.0\.", "Q4_K"), (r"blocks\.1\.self_attn\.", "Q5_1"),
    (r"blocks\.1\.cross_attn\.", "Q4_K"), (r"blocks\.1\.ffn\.0\.", "Q6_K"),
]  # fmt: skip
KEPT_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
KINDS = {
    "Q8_0": lambda name: "Q8_0",
    "Q4_K": lambda name: "Q4_K",
    "mixed": lambda name: next((t for p, t in MIXED if re.match(p, name)), "Q8_0"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny TI2V-style pipeline 256 wide (so that K-quant rows fit) with 4 heads of 64."""
    root = tmp_path_factory.mktemp("gguf")
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=False, shift=5.0, heads=4, head_dim=64)
    use_official_sigmas(pipe)
    init = np.random.default_rng(3).standard_normal((1, 4, 2, 4, 6)).astype(np.float32)
    np.save(root / "init.npy", init)
    return root, pipe, init


def reference_latents(pipe, init, official_values: dict[str, np.ndarray]) -> np.ndarray:
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    weights = {k: torch.from_numpy(official_values[official_transformer_name(k)].reshape(v.shape).copy()) for k, v in original.items()}
    pipe.transformer.load_state_dict(weights)
    try:
        with torch.no_grad():
            return pipe(
                prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                num_inference_steps=STEPS, guidance_scale=4.0, latents=torch.from_numpy(init), output_type="latent",
                max_sequence_length=512,
            ).frames.numpy()
    finally:
        pipe.transformer.load_state_dict(original)


def generate(root: Path, folder: Path) -> np.ndarray:
    out = folder.with_suffix(".npy")
    main([
        "generate", "--model", str(folder), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--size", f"{WIDTH}x{HEIGHT}",
        "--frames", str(FRAMES), "--steps", str(STEPS), "--guidance", "4", "--shift", "5", "--init-latents",
        str(root / "init.npy"), "--save-latents", str(out), "--quiet", "--overwrite",
    ])  # fmt: skip
    return np.load(out)


def load_all(folder: Path, component: str) -> dict[str, mx.array]:
    out = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "mixed"])
def test_gguf_transformer_generates_the_dequantized_reference(tiny, kind, capsys):
    root, pipe, init = tiny
    official = {official_transformer_name(k): v.detach().numpy().astype(np.float32) for k, v in pipe.transformer.state_dict().items()}
    path = root / f"wan-tiny-{kind}.gguf"
    values, types = write_wan_gguf(path, official, KINDS[kind])
    assert types["patch_embedding.weight"] == "F32" and official["patch_embedding.weight"].ndim == 5
    assert types["blocks.0.ffn.2.weight"] == "F16"  # rows of 40 fill no block: ComfyUI-GGUF's fallback

    out = root / f"mlx_{kind}"
    main(["convert", str(root / "diffusers"), str(out), "--transformer", str(path), "--dtype", "fp32", "--overwrite"])
    log = capsys.readouterr().out
    assert "GGUF v3 (wan)" in log

    # the layers kept quantized: MLX affine of the file's bits, dequantizing to the file's values exactly
    record = json.loads((out / "transformer" / "quantization.json").read_text())
    kept = {n[: -len(".weight")]: t for n, t in types.items() if t in KEPT_BITS and re.match(r"blocks\.", n)}
    ours_names = {layer: layer.replace("ffn.0", "ffn.fc1").replace("ffn.2", "ffn.fc2") for layer in kept}
    assert record["mode"] == "affine" and record["scales"] == "float32" and set(record["layers"]) == set(ours_names.values())
    weights = load_all(out, "transformer")
    for layer, tname in kept.items():
        ours_name = ours_names[layer]
        assert record["per_layer"][ours_name] == {"bits": KEPT_BITS[tname], "group_size": 32}
        w = mx.dequantize(weights[f"{ours_name}.weight"], weights[f"{ours_name}.scales"], weights[f"{ours_name}.biases"],
                          group_size=32, bits=KEPT_BITS[tname])
        np.testing.assert_array_equal(np.array(w), values[layer + ".weight"] + 0.0)  # +0.0: llama.cpp's -0 is our +0
    if kind == "mixed":  # Q6_K has no exact affine form: dequantized, stored as float32 here
        assert types["blocks.1.ffn.0.weight"] == "Q6_K" and weights["blocks.1.ffn.fc1.weight"].dtype == mx.float32
        np.testing.assert_array_equal(np.array(weights["blocks.1.ffn.fc1.weight"]), values["blocks.1.ffn.0.weight"])

    ours = generate(root, out)
    ref = reference_latents(pipe, init, values)
    err = rel_err(ours, ref)
    print(f"GGUF {kind}: latents against the dequantized diffusers reference {err:.2e}")
    assert err < 1e-3 and rel_err(init, ref) > 0.05

    if kind == "Q4_K":
        return  # the mixed file has Q4_K layers: its twin covers them
    # the twin: the same dequantized values as a float checkpoint; kept quantized gives the same latents
    twin = root / f"wan-tiny-{kind}-dequantized.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in values.items()}, str(twin))
    twin_out = root / f"mlx_{kind}_twin"
    main(["convert", str(root / "diffusers"), str(twin_out), "--transformer", str(twin), "--dtype", "fp32", "--overwrite"])
    assert not (twin_out / "transformer" / "quantization.json").exists()
    twin_err = rel_err(ours, generate(root, twin_out))
    print(f"GGUF {kind}: kept quantized against its dequantized twin {twin_err:.2e}")
    assert twin_err < 1e-5


def test_gguf_requantized_and_bf16(tiny):
    """--quantize re-quantizes from the dequantized values (no GGUF record); --dtype bf16 keeps the codes with
    float32 scales, and the kept layers answer in bf16 like every other layer."""
    from mlx_video.model_folder import ModelFolder, SameDtypeQuantizedLinear
    from mlx_video.families.wan.transformer import WanTransformer
    from mlx_video.families.wan.config import WanTransformerConfig

    root, pipe, _ = tiny
    official = {official_transformer_name(k): v.detach().numpy().astype(np.float32) for k, v in pipe.transformer.state_dict().items()}
    path = root / "wan-tiny-q8-again.gguf"
    write_wan_gguf(path, official, KINDS["mixed"])
    q4 = root / "mlx_requantized"
    main(["convert", str(root / "diffusers"), str(q4), "--transformer", str(path), "--quantize", "q4", "--group-size", "32", "--overwrite"])
    record = json.loads((q4 / "transformer" / "quantization.json").read_text())
    assert record["bits"] == 4 and "per_layer" not in record and len(record["layers"]) == 2 * 9  # not ffn.fc2 (40 inputs)
    bf16 = root / "mlx_bf16"
    main(["convert", str(root / "diffusers"), str(bf16), "--transformer", str(path), "--overwrite"])
    mf = ModelFolder.open(bf16)
    model = WanTransformer(WanTransformerConfig.from_dict(mf.config("transformer")))
    mf.load_module("transformer", model)
    layer = model.blocks[0].self_attn.q
    assert isinstance(layer, SameDtypeQuantizedLinear) and layer.bits == 8 and layer.scales.dtype == mx.float32
    assert model.blocks[1].self_attn.q.bits == 5
    assert layer(mx.ones((1, 256), dtype=mx.bfloat16)).dtype == mx.bfloat16


# ---------------------------------------------------------------------------------------------------
# full size, header only


def header_only_gguf(path: Path, arch: str, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """A GGUF file with these (type, numpy shape) tensors over sparse, empty data."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    for name, (tname, shape) in tensors.items():
        qt = getattr(Q, tname)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, shape, np.float32 if tname != "F16" else np.float16, nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    end = w.fout[0].tell()
    data = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values())
    w.close()
    with open(path, "r+b") as f:
        f.truncate(gguf.GGUFWriter.ggml_pad(end, w.data_alignment) + data)
    return path


def wan_gguf_header(path: Path, model_id: str, wanted: str) -> Path:
    """A full-size Wan 2.2 transformer as QuantStack's Q4_K_M files name and type it (.v and ffn.2 as Q6_K)."""
    from diffusers import WanTransformer3DModel

    from support.tensor_files import meta_state
    from support.wan_checkpoints import TRANSFORMERS

    sd = meta_state(WanTransformer3DModel, **TRANSFORMERS[model_id])
    tensors = {}
    for key, t in sd.items():
        name = official_transformer_name(key)
        upgrade = wanted == "Q4_K" and re.search(r"\.(v|ffn\.2)\.weight$", name)
        tensors[name] = (storage_type(name, tuple(t.shape), "Q6_K" if upgrade else wanted), tuple(t.shape))
    assert tensors["patch_embedding.weight"][0] == "F32" and len(tensors["patch_embedding.weight"][1]) == 5
    return header_only_gguf(path, "wan", tensors)


def umt5_gguf_header(path: Path) -> Path:
    """UMT5-XXL as llama.cpp names it (arch t5encoder), Q8_0 linears and token embedding."""
    tensors = {"token_embd.weight": ("Q8_0", (256384, 4096)), "enc.output_norm.weight": ("F32", (4096,))}
    for i in range(24):
        p = f"enc.blk.{i}."
        tensors.update({p + "attn_norm.weight": ("F32", (4096,)), p + "ffn_norm.weight": ("F32", (4096,)),
                        p + "attn_rel_b.weight": ("F32", (64, 32)), p + "ffn_down.weight": ("Q8_0", (4096, 10240))})
        tensors.update({p + f"attn_{x}.weight": ("Q8_0", (4096, 4096)) for x in "qkvo"})
        tensors.update({p + f"ffn_{x}.weight": ("Q8_0", (10240, 4096)) for x in ("gate", "up")})
    return header_only_gguf(path, "t5encoder", tensors)


@pytest.fixture(scope="module")
def fullsize(tmp_path_factory):
    from support.wan_checkpoints import vae_file
    from support.wan import train_spiece

    root = tmp_path_factory.mktemp("gguf_fullsize")
    (root / "tok").mkdir()
    train_spiece(root / "tok" / "spiece.model")
    return root, umt5_gguf_header(root / "umt5-xxl-encoder-Q8_0.gguf"), vae_file(root / "vae21.safetensors", "2.1")


@pytest.mark.parametrize("model_id,wanted", [("wan2.2-t2v-a14b", "Q4_K"), ("wan2.2-i2v-a14b", "Q8_0"), ("wan2.2-ti2v-5b", "Q5_K")])
def test_full_size_gguf_files_plan(fullsize, model_id, wanted):
    from mlx_video.convert.convert import plan
    from mlx_video.convert.quantize import plan_item

    root, umt5, vae21 = fullsize
    expert = wan_gguf_header(root / f"{model_id}-{wanted}.gguf", model_id, wanted)
    components = {"transformer": expert, "text_encoder": umt5}
    if model_id != "wan2.2-ti2v-5b":
        components.update(transformer_2=expert, vae=vae21)
    conversion = plan(None, components=components, tokenizer=root / "tok" / "spiece.model", base=model_id)
    layers = 40 if "a14b" in model_id else 30
    counts = {c.name: len(c.tensors) for c in conversion.components}
    assert counts["transformer"] == layers * 27 + 15 and counts["text_encoder"] == 24 * 10 + 2
    assert conversion.manifest["model"] == model_id
    # which weights stay quantized: every block linear but the Q6_K ones; in the UMT5 file all 7 per block
    for comp in conversion.components:
        if comp.name not in ("transformer", "text_encoder"):
            continue
        modes = [plan_item(comp.name, t, k, tr, s, comp.source, "bf16", None, 64).mode for t, (k, s, tr) in comp.tensors.items()]
        kept = modes.count("gguf_affine")
        if comp.name == "text_encoder":
            assert kept == 24 * 7
        else:
            assert kept == layers * (10 - 3 if wanted == "Q4_K" else 10)  # Q4_K_M: self/cross v and ffn.2 are Q6_K


LLAMA_CPP_T5 = {
    "layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b", "layer.1.layer_norm": "ffn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up", "layer.1.DenseReluDense.wo": "ffn_down",
}  # fmt: skip


def test_gguf_umt5_text_encoder_generates_the_dequantized_reference(tiny):
    """The text encoder as a llama.cpp t5encoder GGUF (Q8_0 linears and token embedding, the rest F32 / F16 as
    llama.cpp keeps them): its linears stay quantized, and the pipeline's latents are the reference's whose
    encoder holds the dequantized weights."""
    root, pipe, init = tiny
    state = {k: v.detach().numpy().astype(np.float32) for k, v in pipe.text_encoder.state_dict().items()}
    names = {"shared.weight": "token_embd.weight", "encoder.final_layer_norm.weight": "enc.output_norm.weight"}
    for key in state:
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.*)\.weight", key)
        if m:
            names[key] = f"enc.blk.{m[1]}.{LLAMA_CPP_T5[m[2]]}.weight"
    path = root / "umt5-tiny-Q8_0.gguf"
    w = gguf.GGUFWriter(str(path), arch="t5encoder")
    values, kept = {}, []
    for hf, cpp in names.items():
        x = state[hf]
        if x.ndim == 2 and "rel_b" not in cpp and x.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(x, Q.Q8_0)
            w.add_tensor(cpp, blocks, raw_dtype=Q.Q8_0)
            values[hf] = gguf.quants.dequantize(blocks, Q.Q8_0).reshape(x.shape)
            kept += [hf] if cpp.startswith("enc.blk.") else []
        else:
            dtype = np.float16 if x.ndim == 2 and "rel_b" not in cpp else np.float32
            w.add_tensor(cpp, x.astype(dtype))
            values[hf] = x.astype(dtype).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert len(kept) == 2 * 6  # wo has 48 inputs: not whole Q8_0 blocks, F16 as llama.cpp falls back

    out = root / "mlx_umt5_gguf"
    main(["convert", str(root / "diffusers"), str(out), "--text-encoder", str(path), "--dtype", "fp32", "--overwrite"])
    record = json.loads((out / "text_encoder" / "quantization.json").read_text())
    assert len(record["per_layer"]) == len(kept) and {p["bits"] for p in record["per_layer"].values()} == {8}
    ours = generate(root, out)
    original = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    dequantized = {k: torch.from_numpy(values["shared.weight" if k == "encoder.embed_tokens.weight" else k].copy()) for k in original}
    pipe.text_encoder.load_state_dict(dequantized)
    try:
        with torch.no_grad():
            ref = pipe(
                prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                num_inference_steps=STEPS, guidance_scale=4.0, latents=torch.from_numpy(init), output_type="latent",
                max_sequence_length=512,
            ).frames.numpy()
    finally:
        pipe.text_encoder.load_state_dict(original)
    err = rel_err(ours, ref)
    print(f"GGUF UMT5 Q8_0: latents against the dequantized diffusers reference {err:.2e}")
    assert err < 1e-3


def test_gguf_without_its_5d_patch_embedding_says_which_step_is_missing(tiny):
    from mlx_video.convert.convert import plan
    from mlx_video.errors import MlxVideoError

    root, pipe, _ = tiny
    official = {official_transformer_name(k): v.detach().numpy().astype(np.float32) for k, v in pipe.transformer.state_dict().items()}
    del official["patch_embedding.weight"]  # as ComfyUI-GGUF's convert.py writes it before fix_5d_tensors.py
    path = root / "wan-tiny-no-5d.gguf"
    write_wan_gguf(path, official, KINDS["Q8_0"])
    with pytest.raises(MlxVideoError, match="fix_5d_tensors"):
        plan(root / "diffusers", components={"transformer": path})
