"""ComfyUI files through `mlxvid convert`: all-in-one checkpoints split by prefix, `comfy_quant` nvfp4 / mxfp8 /
int8_tensorwise layers decoded exactly, and the messages for files that are not what they seem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.wan_checkpoints import Tiny, official_transformer_name, official_vae21  # noqa: E402
from support.tensor_files import converted_weights  # noqa: E402

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX v1.0: the magnitudes of codes 0..7; bit 3 is the sign


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]]) -> Path:
    """A safetensors file written by hand, so that any dtype code (F8_E8M0 included) can be used."""
    header, offset, blobs = {}, 0, []
    for name, (code, shape, data) in tensors.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"".join(blobs))
    return path


def as_entry(x: torch.Tensor) -> tuple[str, tuple, bytes]:
    code = {torch.float32: "F32", torch.float16: "F16", torch.uint8: "U8", torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}[x.dtype]
    raw = x.contiguous().view(torch.uint8) if x.dtype != torch.uint8 else x.contiguous()
    return code, tuple(x.shape), raw.numpy().tobytes()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_convert_formats' tiny models (32 wide, 2 heads of 16, FFN 64, a Wan 2.1-style VAE with 16 latent
    channels), and the conversion of their diffusers folder as the reference."""
    t = Tiny(tmp_path_factory.mktemp("comfy_files"))
    main(["convert", str(t.diffusers_folder()), str(t.root / "reference"), "--dtype", "fp32"])
    return t


def all_in_one_file(t: Tiny) -> Path:
    """The transformer (official names), UMT5 (transformers names, with its SentencePiece model) and the Wan 2.1
    VAE (official names) in one file, under ComfyUI's checkpoint prefixes."""
    tensors = {}
    for k, v in t.transformer.state_dict().items():
        tensors["model.diffusion_model." + official_transformer_name(k)] = as_entry(v.float())
    for k, v in t.text_encoder.state_dict().items():
        if k != "encoder.embed_tokens.weight":
            tensors["text_encoders.umt5xxl.transformer." + k] = as_entry(v.float())
    spiece = t.spiece.read_bytes()
    tensors["text_encoders.umt5xxl.spiece_model"] = ("U8", (len(spiece),), spiece)
    for k, v in official_vae21(t.vae.state_dict(), 1).items():
        tensors["vae." + k] = as_entry(v.float())
    return write_safetensors(t.root / "wan_all_in_one.safetensors", tensors)


@pytest.mark.parametrize("as_folder", [False, True])
def test_all_in_one_checkpoint_is_split_by_prefix(tiny, tiny_registry, as_folder, capsys):
    root = tiny.root
    path = all_in_one_file(tiny)
    src = path
    if as_folder:
        src = root / "aio_folder"
        src.mkdir(exist_ok=True)
        (src / path.name).write_bytes(path.read_bytes())
    out = root / f"mlx_aio_{as_folder}"
    main(["convert", str(src), str(out), "--base", "tiny-wan", "--dtype", "fp32", "--overwrite"])
    log = capsys.readouterr().out
    assert "all-in-one checkpoint holding the transformer (model.diffusion_model.)" in log
    ref = root / "reference"
    for component in ("transformer", "text_encoder", "vae"):
        ours, want = converted_weights(out, component), converted_weights(ref, component)
        assert ours.keys() == want.keys(), component
        for k in want:
            np.testing.assert_array_equal(ours[k], want[k], err_msg=f"{component} {k}")
    assert (out / "tokenizer" / "spiece.model").read_bytes() == tiny.spiece.read_bytes()


# ---------------------------------------------------------------------------------------------------
# comfy_quant block formats


def e4m3_codes(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """float8 e4m3fn codes of `values` (torch's cast) and the values they stand for."""
    t = torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn)
    return t.view(torch.uint8).numpy(), t.float().numpy()


def nvfp4_layer(rng, rows: int, cols: int):
    from mlx_video.convert.comfy_quant import block_scales

    codes = rng.integers(0, 16, size=(rows, cols)).astype(np.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # the first element of a pair in the high nibble
    scale_codes, scale_values = e4m3_codes(rng.uniform(0.01, 0.2, size=(rows, cols // 16)))
    tensor_scale = np.float32(0.37)
    magnitude = np.array(E2M1, np.float64)[codes & 7] * np.where(codes & 8, -1, 1)
    expected = (magnitude * np.repeat(scale_values, 16, axis=1) * np.float64(tensor_scale)).astype(np.float32)
    blocked = block_scales(scale_codes, rows, cols // 16)
    side = {
        "weight": ("U8", packed.shape, packed.tobytes()),
        "weight_scale": ("F8_E4M3", blocked.shape, blocked.tobytes()),
        "weight_scale_2": ("F32", (), tensor_scale.tobytes()),
        "input_scale": ("F32", (), np.float32(1.0).tobytes()),
    }
    return side, expected


def mxfp8_layer(rng, rows: int, cols: int):
    from mlx_video.convert.comfy_quant import block_scales

    codes, values = e4m3_codes(rng.standard_normal((rows, cols)) * 20)
    exponents = rng.integers(120, 130, size=(rows, cols // 32)).astype(np.uint8)
    expected = (values.astype(np.float64) * np.repeat(2.0 ** (exponents.astype(np.float64) - 127), 32, axis=1)).astype(np.float32)
    blocked = block_scales(exponents, rows, cols // 32)
    return {"weight": ("F8_E4M3", codes.shape, codes.tobytes()), "weight_scale": ("F8_E8M0", blocked.shape, blocked.tobytes())}, expected


def int8_layer(rng, rows: int, cols: int, per_row: bool):
    codes = rng.integers(-128, 128, size=(rows, cols)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, size=(rows, 1) if per_row else ()).astype(np.float32)
    expected = (codes.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
    return {"weight": ("I8", codes.shape, codes.tobytes()), "weight_scale": ("F32", scale.shape, scale.tobytes())}, expected


@pytest.fixture(scope="module")
def comfy_quant(tiny):
    """A ComfyUI transformer file of tiny's weights in comfy_quant formats: nvfp4 (self-attention), mxfp8 with
    F8_E8M0 scales (cross-attention), int8_tensorwise (FFN); (its path, the weights its codes decode to)."""
    rng = np.random.default_rng(7)
    tensors, expected = {}, {}
    for k, v in tiny.transformer.state_dict().items():
        name = "model.diffusion_model." + official_transformer_name(k)
        layer = name[: -len(".weight")]
        rows, cols = v.shape if v.ndim == 2 else (0, 0)
        if ".self_attn." in name and name.endswith(".weight") and v.ndim == 2:
            fmt, (side, values) = "nvfp4", nvfp4_layer(rng, rows, cols)
        elif ".cross_attn." in name and name.endswith(".weight") and v.ndim == 2:
            fmt, (side, values) = "mxfp8", mxfp8_layer(rng, rows, cols)
        elif ".ffn." in name and name.endswith(".weight"):
            fmt, (side, values) = "int8_tensorwise", int8_layer(rng, rows, cols, per_row=".ffn.0." in name)
        else:
            tensors[name] = as_entry(v.float())
            continue
        for suffix, entry in side.items():
            tensors[f"{layer}.{suffix}"] = entry
        conf = json.dumps({"format": fmt}).encode()
        tensors[f"{layer}.comfy_quant"] = ("U8", (len(conf),), conf)
        expected[official_transformer_name(k)] = values
    return write_safetensors(tiny.root / "wan_comfy_quant.safetensors", tensors), expected


def test_comfy_quant_block_formats_convert_exactly(tiny, comfy_quant, capsys):
    """nvfp4 (self-attention), mxfp8 with F8_E8M0 scales (cross-attention) and int8_tensorwise (FFN, one scale
    per row and one per tensor): the converted weights are the published formulas' values, exactly (nvfp4 and
    mxfp8 kept in MLX's own modes), and the transformer gives the output of the reference holding them."""
    path, expected = comfy_quant
    out = tiny.root / "mlx_comfy_quant"
    main(["convert", str(tiny.diffusers_folder()), str(out), "--transformer", str(path), "--dtype", "fp32", "--overwrite"])
    log = capsys.readouterr().out
    assert "comfy_quant 4 int8_tensorwise, 8 mxfp8, 8 nvfp4 tensors" in log
    ours = converted_weights(out, "transformer")
    record = json.loads((out / "transformer" / "quantization.json").read_text())
    ours_names = {"ffn.0": "ffn.fc1", "ffn.2": "ffn.fc2"}
    modes = {layer: p.get("mode") for layer, p in record["per_layer"].items()}
    # kept in MLX's own modes: self-attention nvfp4, cross-attention mxfp8; int8 is decoded
    assert set(record["layers"]) == set(modes) and sorted(modes.values()) == ["mxfp8"] * 8 + ["nvfp4"] * 8
    for name, values in expected.items():
        target = name
        for a, b in ours_names.items():
            target = target.replace(a, b)
        layer = target[: -len(".weight")]
        if layer in modes:
            group, bits = (32, 8) if modes[layer] == "mxfp8" else (16, 4)
            w = mx.dequantize(mx.array(ours[target]), mx.array(ours[layer + ".scales"]), group_size=group, bits=bits,
                              mode=modes[layer], dtype=mx.float32)
            if modes[layer] == "nvfp4":
                w = w * mx.array(ours[layer + ".tensor_scale"])
            np.testing.assert_array_equal(np.array(w), values, err_msg=name)
        else:
            np.testing.assert_array_equal(ours[target], values, err_msg=name)
    # the whole transformer: the reference model holding the decoded weights
    weights = {}
    for k, v in tiny.transformer.state_dict().items():
        name = official_transformer_name(k)
        weights[k] = torch.from_numpy(expected[name].copy()) if name in expected else v
    err = float(np.linalg.norm(tiny.ours(out) - tiny.reference(weights)) / np.linalg.norm(tiny.reference(weights)))
    print(f"comfy_quant nvfp4/mxfp8/int8 transformer against the decoded reference: {err:.2e}")
    assert err < 1e-5


def test_weight_scale_without_comfy_quant_is_labelled_as_such(tmp_path):
    from mlx_video.convert.formats import ComponentSource, open_tensors

    codes, _ = e4m3_codes(np.linspace(-2, 2, 64).reshape(8, 8))
    path = write_safetensors(tmp_path / "kj.safetensors", {
        "blocks.0.ffn.0.weight": ("F8_E4M3", (8, 8), codes.tobytes()),
        "blocks.0.ffn.0.weight_scale": ("F32", (), np.float32(0.5).tobytes()),
    })  # fmt: skip
    scheme = ComponentSource(open_tensors(path, "kj"), "kj").scheme()
    assert "no comfy_quant" in scheme and "mixed precision" not in scheme


def test_nvfp4_without_comfy_quant_names_what_is_missing(tmp_path):
    from mlx_video.convert.formats import ComponentSource, open_tensors

    path = write_safetensors(tmp_path / "fp4.safetensors", {
        "blocks.0.ffn.0.weight": ("U8", (16, 8), bytes(128)),
        "blocks.0.ffn.0.weight_scale": ("F8_E4M3", (128, 4), bytes(512)),
        "blocks.0.ffn.0.weight_scale_2": ("F32", (), np.float32(1).tobytes()),
    })  # fmt: skip
    with pytest.raises(MlxVideoError, match="weight_scale_2 .* but no comfy_quant"):
        ComponentSource(open_tensors(path, "fp4"), "fp4")


def test_folder_with_one_a14b_expert_names_the_missing_one(tmp_path):
    from support.wan_checkpoints import transformer_file, umt5_file

    from mlx_video.convert.convert import plan

    folder = tmp_path / "comfy"
    folder.mkdir()
    transformer_file(folder / "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2-t2v-a14b", "comfy_fp16")
    umt5_file(folder / "umt5_xxl_bf16.safetensors", "transformers")
    with pytest.raises(MlxVideoError, match=r"the high-noise expert of wan2\.2-t2v-a14b.*The low-noise expert is missing"):
        plan(folder)


def test_comfy_quant_native_layers_in_bf16(tiny, comfy_quant):
    """A bf16 folder from the same file: the nvfp4 / mxfp8 layers load as MLX quantized layers and answer in bf16."""
    from mlx_video.model_folder import ModelFolder, SameDtypeQuantizedLinear, TensorScaledQuantizedLinear
    from mlx_video.families.wan.config import WanTransformerConfig
    from mlx_video.families.wan.transformer import WanTransformer

    path, _ = comfy_quant
    out = tiny.root / "mlx_comfy_quant_bf16"
    main(["convert", str(tiny.diffusers_folder()), str(out), "--transformer", str(path), "--overwrite"])
    mf = ModelFolder.open(out)
    model = WanTransformer(WanTransformerConfig.from_dict(mf.config("transformer")))
    mf.load_module("transformer", model)
    q, k = model.blocks[0].self_attn.q, model.blocks[0].cross_attn.k
    assert isinstance(q, TensorScaledQuantizedLinear) and q.mode == "nvfp4" and q.tensor_scale.item() == np.float32(0.37)
    assert isinstance(k, SameDtypeQuantizedLinear) and k.mode == "mxfp8"
    x = mx.ones((1, 32), dtype=mx.bfloat16)
    assert q(x).dtype == mx.bfloat16 and k(x).dtype == mx.bfloat16
