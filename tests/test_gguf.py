"""The GGUF reader: dequantization bit for bit against the `gguf` package (llama.cpp's gguf-py), the exact
MLX affine form, files written by `gguf.GGUFWriter` read back lazily, T5 names, and broken files."""

import struct
import time

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from mlx_video.convert.gguf import (  # noqa: E402
    AFFINE_BITS,
    GGML_TYPES,
    TYPE_IDS,
    GGUFFile,
    GGUFTensors,
    dequantize,
    gguf_names,
    is_gguf,
    to_mlx_affine,
)
from mlx_video.errors import MlxVideoError  # noqa: E402

# byte offsets of the fp16 fields (d, m, dmin) in each block type; Q8_K's d is a float32 at 0
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip
BLOCK_TYPES = list(FP16_FIELDS)


def random_blocks(name: str, n: int, seed: int) -> np.ndarray:
    """n random blocks in which every non-float byte position takes all 256 values (n >= 256), fp16 fields finite."""
    t = GGML_TYPES[TYPE_IDS[name]]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, t.block_bytes), dtype=np.uint8)
    floats = {at + k for at in FP16_FIELDS[name] for k in (0, 1)}
    for col in range(t.block_bytes):
        if col not in floats:
            b[:256, col] = rng.permutation(256)[:n]
    for at in FP16_FIELDS[name]:
        bits = b[:, at : at + 2].copy().view("<u2")[:, 0]
        # every finite fp16 bit pattern (a run of them per block), then exponents 31 (inf/nan) made finite
        bits[: min(n, 65536)] = np.arange(min(n, 65536), dtype=np.uint16) + rng.integers(0, 65536, dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)
        b[:, at : at + 2] = bits.astype("<u2").view(np.uint8).reshape(n, 2)
    return b


def assert_same_bits(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_block_types_match_gguf_py(name):
    n = 65536 if GGML_TYPES[TYPE_IDS[name]].block_elems == 32 else 4096
    blocks = random_blocks(name, n, seed=TYPE_IDS[name])
    want = gguf.quants.dequantize(blocks, getattr(Q, name)).reshape(-1)
    got = dequantize(blocks, name)
    assert got.dtype == np.float32 and np.isfinite(want).all()
    assert_same_bits(got, want)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_match_gguf_py(name):
    rng = np.random.default_rng(1)
    if name == "F32":
        raw = rng.integers(0, 2**32, size=4096, dtype=np.uint32).view(np.float32)
    elif name == "F16":
        raw = np.arange(65536, dtype=np.uint16).view(np.float16)  # every code
    else:
        raw = np.arange(65536, dtype=np.uint16)
    stored = raw.view(np.uint8) if name == "BF16" else raw
    want = gguf.quants.dequantize(stored, getattr(Q, name)).reshape(-1)
    got = dequantize(raw, name)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    assert_same_bits(got[~nan], want[~nan])


def test_q8_k_against_its_struct_layout():
    # gguf-py has no Q8_K decoder: read the C struct (float d; int8 qs[256]; int16 bsums[16]) by hand
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(3, 292), dtype=np.uint8)
    for i, d in enumerate([0.5, -3.25e-3, 7.0]):
        blocks[i, :4] = np.frombuffer(struct.pack("<f", d), np.uint8)
    want = []
    for blk in blocks:
        d = struct.unpack("<f", blk[:4].tobytes())[0]
        want += [np.float32(d) * np.float32(v) for v in struct.unpack("<256b", blk[4:260].tobytes())]
    assert_same_bits(dequantize(blocks, "Q8_K"), np.array(want, np.float32))


@pytest.mark.parametrize("name", list(AFFINE_BITS))
def test_mlx_affine_form_is_exact(name):
    t = GGML_TYPES[TYPE_IDS[name]]
    rows, cols = 24, 2 * max(t.block_elems, 128)
    blocks = random_blocks(name, rows * cols // t.block_elems, seed=100 + TYPE_IDS[name])
    want = dequantize(blocks, name).reshape(rows, cols)
    aff = to_mlx_affine(blocks, name, (rows, cols))
    assert (aff.bits, aff.group_size) == (AFFINE_BITS[name], 32) and aff.weight.dtype == mx.uint32
    got = np.array(aff.dequantize(dtype=mx.float32))
    # equal as numbers (a llama.cpp -0.0 may come back as +0.0), and bit for bit everywhere else
    np.testing.assert_array_equal(got, want)
    nonzero = want != 0
    assert_same_bits(got[nonzero], want[nonzero])
    # and usable as it stands
    x = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), aff.weight, aff.scales, aff.biases, group_size=32, bits=aff.bits)
    ref = x.astype(np.float64) @ want.T.astype(np.float64)
    assert np.linalg.norm(np.array(y) - ref) / np.linalg.norm(ref) < 1e-5


def test_affine_refuses_types_without_an_exact_form():
    blocks = random_blocks("Q6_K", 1, seed=0)
    with pytest.raises(MlxVideoError, match="Q6_K"):
        to_mlx_affine(blocks, "Q6_K", (1, 256))


# ---------------------------------------------------------------------------------------------------
# files


def write_mixed_file(path, rng):
    """A Wan-like GGUF with several storage types, metadata of several types and the 5-D patch embedding."""
    w = gguf.GGUFWriter(str(path), arch="wan")
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -7)
    w.add_float32("test.f32", 0.25)
    w.add_float64("test.f64", -1.5e-300)
    w.add_bool("test.flag", True)
    w.add_string("test.name", "ünïcode")
    w.add_array("test.ints", [3, -1, 4])
    w.add_array("test.strings", ["a", "", "xyz"])
    w.add_array("test.floats", [0.5, 2.0])
    w.add_array("comfy.gguf.orig_shape.fixed.weight", [3, 2, 8])  # stored as (6, 8), read as (3, 2, 8)
    w.add_array("comfy.gguf.orig_shape.fixed_q.weight", [24, 16])  # Q8_0 (4, 96): rows of half a block
    tensors = {}
    x = rng.standard_normal((40, 96)).astype(np.float32)
    tensors["blocks.0.self_attn.q.weight"] = ("Q8_0", gguf.quants.quantize(x, Q.Q8_0), (40, 96))
    tensors["blocks.0.self_attn.k.weight"] = ("Q4_0", gguf.quants.quantize(x, Q.Q4_0), (40, 96))
    tensors["blocks.0.self_attn.v.weight"] = ("Q5_1", gguf.quants.quantize(x, Q.Q5_1), (40, 96))
    k_quants = {"blocks.0.ffn.0.weight": "Q4_K", "blocks.0.ffn.2.weight": "Q6_K", "blocks.0.cross_attn.o.weight": "Q3_K"}
    for name, tname in k_quants.items():
        t = GGML_TYPES[TYPE_IDS[tname]]
        raw = random_blocks(tname, 6 * 2, seed=len(name)).reshape(6, 2 * t.block_bytes)  # rows of 512
        tensors[name] = (tname, raw, (6, 512))
    tensors["head.modulation"] = ("F32", rng.standard_normal((1, 2, 16)).astype(np.float32), (1, 2, 16))
    patch = rng.standard_normal((16, 4, 1, 2, 2)).astype(np.float32)
    tensors["patch_embedding.weight"] = ("F32", patch, patch.shape)
    tensors["text_embedding.0.weight"] = ("F16", rng.standard_normal((8, 12)).astype(np.float16), (8, 12))
    bf = rng.integers(0, 2**16, size=(5, 6), dtype=np.uint16)
    bf = np.where((bf & 0x7F80) == 0x7F80, bf & 0xBFFF, bf).astype(np.uint16)
    tensors["blocks.0.norm3.weight"] = ("BF16", bf, (5, 6))
    tensors["fixed.weight"] = ("F32", rng.standard_normal((6, 8)).astype(np.float32), (3, 2, 8))
    tensors["fixed_q.weight"] = ("Q8_0", gguf.quants.quantize(x[:4], Q.Q8_0), (24, 16))
    for name, (tname, data, _) in tensors.items():
        if tname in ("F32", "F16"):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data.view(np.uint8) if tname == "BF16" else data, raw_dtype=getattr(Q, tname))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def reference_values(tname, data):
    if tname == "F32":
        return data.astype(np.float32)
    if tname == "F16":
        return data.astype(np.float32)
    if tname == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return gguf.quants.dequantize(data, getattr(Q, tname))


def test_written_file_reads_back(tmp_path):
    path = tmp_path / "wan-mixed.gguf"
    tensors = write_mixed_file(path, np.random.default_rng(5))
    assert is_gguf(path)
    g = GGUFFile(path)
    assert g.version == 3 and g.architecture == "wan" and g.alignment == 32
    m = g.metadata
    assert m["test.u32"] == 4000000000 and m["test.i32"] == -7 and m["test.f32"] == 0.25
    assert m["test.f64"] == -1.5e-300 and m["test.flag"] is True and m["test.name"] == "ünïcode"
    assert list(m["test.ints"]) == [3, -1, 4] and m["test.strings"] == ["a", "", "xyz"]
    np.testing.assert_array_equal(m["test.floats"], np.array([0.5, 2.0], np.float32))
    assert g.metadata_types["test.strings"] == ("ARRAY", "STRING")
    assert sorted(g.keys()) == sorted(tensors)
    reader = gguf.GGUFReader(str(path))  # the package's own view of the same file
    for t in reader.tensors:
        tname, data, shape = tensors[t.name]
        info = g.info(t.name)
        assert info.type_name == tname == t.tensor_type.name
        assert info.stored_shape == tuple(int(d) for d in reversed(t.shape))
        assert info.shape == shape
        want = reference_values(tname, data).reshape(shape)
        got = g.read(t.name)
        assert got.shape == shape
        assert_same_bits(got, want)
        rows = shape[0]
        if rows > 2:  # row ranges read only their blocks and give the same values
            assert_same_bits(g.read(t.name, 1, rows - 1), want[1 : rows - 1])
    # the converter's view: float tensors raw, quantized ones as float32, affine forms where exact
    tf = GGUFTensors(path)
    assert tf.code("text_embedding.0.weight") == "F16" and tf.read("text_embedding.0.weight").dtype == mx.float16
    assert tf.code("blocks.0.norm3.weight") == "BF16" and tf.read("blocks.0.norm3.weight").dtype == mx.bfloat16
    assert tf.code("blocks.0.ffn.0.weight") == "F32" and tf.ggml_type("blocks.0.ffn.0.weight") == "Q4_K"
    assert tf.shape("patch_embedding.weight") == (16, 4, 1, 2, 2)
    aff = tf.affine("blocks.0.self_attn.q.weight")
    np.testing.assert_array_equal(np.array(aff.dequantize(dtype=mx.float32)), g.read("blocks.0.self_attn.q.weight"))
    assert tf.affine("blocks.0.ffn.2.weight") is None  # Q6_K has groups of 16
    assert "Q8_0" in tf.describe() and tf.stored_nbytes("blocks.0.self_attn.q.weight") == 40 * 96 // 32 * 34


def test_t5_names_map_onto_transformers_umt5(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.UMT5Config(vocab_size=50, d_model=24, d_kv=6, d_ff=36, num_layers=3, num_heads=4)
    model = transformers.UMT5EncoderModel(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # the same tensors under llama.cpp's names, as convert_hf_to_gguf.py writes a t5encoder
    names = {"shared.weight": "token_embd.weight", "encoder.final_layer_norm.weight": "enc.output_norm.weight"}
    parts = {
        "layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
        "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
        "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b", "layer.1.layer_norm": "ffn_norm",
        "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
        "layer.1.DenseReluDense.wo": "ffn_down",
    }  # fmt: skip
    for i in range(config.num_layers):
        for ours, theirs in parts.items():
            names[f"encoder.block.{i}.{ours}.weight"] = f"enc.blk.{i}.{theirs}.weight"
    path = tmp_path / "umt5.gguf"
    w = gguf.GGUFWriter(str(path), arch="t5encoder")
    for hf, cpp in names.items():
        w.add_tensor(cpp, state[hf])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = GGUFFile(path)
    mapped = gguf_names(g)
    assert set(mapped) == set(state) - {"encoder.embed_tokens.weight"}  # the tied copy of `shared`
    tf = GGUFTensors(path)
    for hf in mapped:
        assert tf.shape(hf) == state[hf].shape
        np.testing.assert_array_equal(np.array(tf.read(hf)), state[hf])


# ---------------------------------------------------------------------------------------------------
# broken files


def gguf_bytes(tensors=(("w", (32, 4), 0, 0),), kv=(), version=3, alignment=None):
    """A GGUF header by hand: tensors as (name, dims innermost first, type id, offset)."""
    def s(x):
        return struct.pack("<Q", len(x.encode())) + x.encode()

    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv) + (alignment is not None))
    if alignment is not None:
        out += s("general.alignment") + struct.pack("<II", 4, alignment)
    for key, vtype, payload in kv:
        out += s(key) + struct.pack("<I", vtype) + payload
    for name, dims, tid, off in tensors:
        out += s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", tid, off)
    align = alignment or 32
    return out + b"\0" * (-len(out) % align)


def test_hand_written_header_and_alignment(tmp_path):
    path = tmp_path / "a.gguf"
    head = gguf_bytes([("a", (32, 2), 0, 0), ("b", (3,), 1, 256)], alignment=128)
    path.write_bytes(head + np.arange(64, dtype=np.float32).tobytes() + np.array([1, 2, 3], np.float16).tobytes())
    g = GGUFFile(path)
    assert g.alignment == 128 and g.data_start == len(head)
    np.testing.assert_array_equal(g.read("a"), np.arange(64, dtype=np.float32).reshape(2, 32))
    np.testing.assert_array_equal(g.read("b"), [1, 2, 3])


BROKEN = {
    "wrong magic": (b"GGML" + bytes(60), "not a GGUF file"),
    "too short": (b"GGUF\x03\x00", "only 6 bytes"),
    "version 1": (gguf_bytes(version=1), "v1"),
    "version 9": (gguf_bytes(version=9), "version 9"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "header cut": (gguf_bytes()[:40], "truncated"),
    "data missing": (gguf_bytes(), "truncated: tensor 'w'"),
    "unknown type": (gguf_bytes([("w", (32,), 99, 0)]) + bytes(512), "unknown type 99"),
    "i-quant": (gguf_bytes([("w", (256,), 16, 0)]) + bytes(512), "IQ2_XXS"),
    "row not whole blocks": (gguf_bytes([("w", (48, 2), 8, 0)]) + bytes(512), "not a multiple of 32"),
    "misaligned": (gguf_bytes([("w", (32,), 0, 8)]) + bytes(512), "alignment"),
    "huge count": (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0) + bytes(32), "claims"),
    "huge string": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + bytes(32), "truncated"),
    "overlap": (gguf_bytes([("a", (32,), 0, 0), ("b", (32,), 0, 64)]) + bytes(512), "overlap"),
    "bad alignment": (gguf_bytes(alignment=24) + bytes(512), "power of two"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_name_the_file_and_the_problem(tmp_path, case):
    data, message = BROKEN[case]
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    path.write_bytes(data)
    with pytest.raises(MlxVideoError) as err:
        GGUFFile(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_header_cost_does_not_depend_on_the_file_size(tmp_path):
    # a 64 GiB F16 tensor in a sparse file: opening and reading two rows touch only their bytes
    rows, cols = 2**20, 2**15
    head = gguf_bytes([("big", (cols, rows), 1, 0)])
    path = tmp_path / "sparse.gguf"
    with open(path, "wb") as f:
        f.write(head)
        f.seek(len(head) + rows * cols * 2 - 2)
        f.write(np.float16(1.5).tobytes())
    t0 = time.perf_counter()
    g = GGUFFile(path)
    first = g.read("big", 0, 2)
    last = g.read("big", rows - 1, rows)
    assert time.perf_counter() - t0 < 2.0
    assert g.info("big").shape == (rows, cols) and first.shape == (2, cols) and not first.any()
    assert last[0, -1] == 1.5 and not last[0, :-1].any()
