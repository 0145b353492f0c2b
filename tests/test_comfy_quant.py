"""comfy_quant nvfp4 / mxfp8 / int8_tensorwise decoders, bit for bit against references built from the published
formats (OCP MX v1.0 for e2m1 and e8m0, PyTorch's float8_e4m3fn for e4m3, cuBLAS's block-scale layout by its
index formula), and MLX's own mxfp8 / nvfp4 modes holding the same codes."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_video.convert.comfy_quant import (
    E2M1,
    E8M0,
    block_scales,
    decode_int8,
    decode_mxfp8,
    decode_nvfp4,
    dequantize,
    hadamard_signs,
    parse_config,
    stored_shape_to_padded,
    to_mlx_int8,
    to_mlx_mxfp8,
    to_mlx_nvfp4,
    unblock_scales,
)
from mlx_video.errors import MlxVideoError

torch = pytest.importorskip("torch")

# OCP Microscaling Formats v1.0, FP4 E2M1: codes 0..7 are these magnitudes, 8..15 their negatives
OCP_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e4m3_reference(codes):
    return torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)).view(torch.float8_e4m3fn).double().numpy()


def e2m1_reference(codes):
    codes = np.asarray(codes)
    return np.where(codes >= 8, -1.0, 1.0) * np.array(OCP_E2M1)[codes & 7]


def e8m0_reference(codes):
    values = [math.nan if c == 255 else math.ldexp(1.0, int(c) - 127) for c in np.ravel(codes)]
    return np.array(values).reshape(np.shape(codes))


def blocked_reference(plain):
    """cuBLAS 1D block-scaling layout by its index formula: one 512-byte tile per 128 rows x 4 columns."""
    rows, cols = plain.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    out = np.zeros(row_tiles * col_tiles * 512, dtype=plain.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * col_tiles + c // 4
            out[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = plain[r, c]
    return out.reshape(row_tiles * 128, col_tiles * 4)


def same_bits(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_e2m1_all_16_codes():
    same_bits(E2M1, e2m1_reference(np.arange(16)))
    assert np.signbit(E2M1[8]) and not np.signbit(E2M1[0])  # 0b1000 is -0


def test_e8m0_all_256_codes():
    same_bits(E8M0, e8m0_reference(np.arange(256)))
    assert E8M0[0] == 2.0**-127 and E8M0[127] == 1.0 and E8M0[254] == 2.0**127 and math.isnan(E8M0[255])


@pytest.mark.parametrize("rows, cols", [(1, 1), (128, 4), (200, 7), (300, 13)])
def test_block_scale_layout(rows, cols):
    plain = np.random.default_rng(rows).integers(0, 256, size=(rows, cols), dtype=np.uint8)
    blocked = blocked_reference(plain)
    np.testing.assert_array_equal(unblock_scales(blocked, rows, cols), plain)
    np.testing.assert_array_equal(block_scales(plain, rows, cols), blocked)


def nvfp4_case(rows, cols, seed):
    """Codes, scale codes covering every e4m3 code, and the packed / blocked tensors ComfyUI stores."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(rows, cols), dtype=np.uint8)
    codes[0, :16] = np.arange(16)
    scales = rng.integers(0, 256, size=(rows, cols // 16), dtype=np.uint8)
    n = min(scales.size, 256)
    scales.reshape(-1)[:n] = np.arange(256)[:n]
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # the first element of a pair in the high nibble
    return codes, scales, packed.astype(np.uint8), blocked_reference(scales)


def test_nvfp4_decodes_exactly():
    rows, cols = 48, 96  # 288 scale blocks: every e4m3 scale code, every e2m1 code
    codes, scales, packed, blocked = nvfp4_case(rows, cols, 0)
    g = np.float32(3.7e-3)
    # float64 holds e2m1 * e4m3 * g exactly (2 + 4 + 24 significant bits); one rounding to float32
    want = (e2m1_reference(codes) * np.repeat(e4m3_reference(scales), 16, axis=1) * np.float64(g)).astype(np.float32)
    same_bits(decode_nvfp4(packed, blocked, g), want)
    same_bits(dequantize("nvfp4", packed, {"weight_scale": blocked, "weight_scale_2": np.array(g)}), want)


def test_nvfp4_padded_storage_is_cut_to_the_logical_shape():
    rows, cols = 20, 40  # stored padded to (32, 48) as comfy-kitchen does
    codes, scales, packed, blocked = nvfp4_case(32, 48, 1)
    codes[rows:], codes[:, cols:] = 0, 0
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8)
    assert stored_shape_to_padded("nvfp4", packed.shape) == (32, 48)
    got = decode_nvfp4(packed, blocked, np.float32(1.0), shape=(rows, cols))
    want = (e2m1_reference(codes) * np.repeat(e4m3_reference(scales), 16, axis=1)).astype(np.float32)[:rows, :cols]
    same_bits(got, want)
    with pytest.raises(MlxVideoError, match="larger"):
        decode_nvfp4(packed, blocked, 1.0, shape=(40, 40))


def test_mxfp8_decodes_exactly():
    rows, cols = 16, 512  # 256 blocks: every e8m0 code; every e4m3 code in row 0
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    codes[0, :256] = np.arange(256)
    scales = np.arange(256, dtype=np.uint8).reshape(rows, cols // 32)
    blocked = blocked_reference(scales)
    with np.errstate(over="ignore", invalid="ignore"):
        want = (e4m3_reference(codes) * np.repeat(e8m0_reference(scales), 32, axis=1)).astype(np.float32)
    same_bits(decode_mxfp8(codes, blocked), want)
    same_bits(decode_mxfp8(codes.view(np.int8), blocked, shape=(10, 64)), want[:10, :64])


@pytest.mark.parametrize("per_row", [False, True])
def test_int8_tensorwise(per_row):
    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, size=(12, 64), dtype=np.int8)
    scale = np.exp(rng.uniform(-9, 1, size=(12, 1) if per_row else ())).astype(np.float32)
    want = (q.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
    same_bits(decode_int8(q, scale), want)
    conf = parse_config('{"format": "int8_tensorwise"}')
    same_bits(dequantize("int8_tensorwise", q, {"weight_scale": scale}, conf), want)


@pytest.mark.parametrize("group", [16, 64])
def test_int8_convrot_undoes_the_rotation(group):
    rng = np.random.default_rng(4)
    rows, cols = 10, 4 * group
    # ComfyUI's ConvRot: H = kron powers of the regular 4x4 Hadamard matrix / sqrt(group), W_stored = W @ H^T
    h4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.float64)
    h = h4
    for _ in range(int(math.log(group, 4)) - 1):
        h = np.kron(h, h4)
    h /= math.sqrt(group)
    np.testing.assert_array_equal(hadamard_signs(group), h * math.sqrt(group))
    q = rng.integers(-128, 128, size=(rows, cols), dtype=np.int8)
    scale = np.exp(rng.uniform(-8, 0, size=(rows, 1))).astype(np.float32)
    # float64 sums these exactly (integer multiples of scale / sqrt(group)), then one rounding
    want = ((q.astype(np.float64) * scale).reshape(rows, -1, group) @ h.T).reshape(rows, cols).astype(np.float32)
    conf = parse_config('{"format": "int8_tensorwise", "params": {"convrot": true, "convrot_groupsize": %d}}' % group)
    same_bits(dequantize("int8_tensorwise", q, {"weight_scale": scale}, conf), want)
    # a rotated quantization of W decodes back to about W
    w = rng.standard_normal((rows, cols))
    rotated = (w.reshape(rows, -1, group) @ h.T).reshape(rows, cols)
    s = np.abs(rotated).max(axis=1, keepdims=True) / 127
    back = decode_int8(np.round(rotated / s).astype(np.int8), s.astype(np.float32), convrot=True, group_size=group)
    assert np.abs(back - w).max() < 0.02 * np.abs(w).max()


def test_config_parsing_and_unknown_formats():
    assert parse_config(np.frombuffer(b'{"format": "mxfp8"}', np.uint8)) == {"format": "mxfp8"}
    assert parse_config('{"format": "int8_tensorwise", "convrot": true, "params": {"convrot": false, "x": 1}}') == {
        "format": "int8_tensorwise", "convrot": True, "x": 1,
    }  # fmt: skip
    with pytest.raises(MlxVideoError, match="no format"):
        parse_config('{"convrot": true, "per_row": true}')  # the retired int8_w8a8 marker
    with pytest.raises(MlxVideoError, match="svdquant"):
        dequantize("svdquant_w4a4", np.zeros((2, 2), np.int8), {})
    with pytest.raises(MlxVideoError, match="power of 4"):
        hadamard_signs(32)


# ---------------------------------------------------------------------------------------------------
# MLX native modes


def test_mlx_mxfp8_mode_holds_the_codes_exactly():
    rows, cols = 16, 512
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    codes[0, :256] = np.arange(256)
    scales = np.arange(256, dtype=np.uint8).reshape(rows, cols // 32)
    blocked = blocked_reference(scales)
    want = decode_mxfp8(codes, blocked)
    w, s = to_mlx_mxfp8(codes, blocked)
    got = np.array(mx.dequantize(w, s, group_size=32, bits=8, mode="mxfp8", dtype=mx.float32))
    # exact for every scale but 0xFF, which MLX reads as 2**128 (inf) where the spec has NaN
    ok = np.repeat(scales != 255, 32, axis=1)
    same_bits(got[ok], want[ok])


def test_mlx_nvfp4_mode_holds_the_codes_exactly():
    rows, cols = 48, 96
    codes, scales, packed, blocked = nvfp4_case(rows, cols, 6)
    g = np.float32(2.5e-3)
    want = decode_nvfp4(packed, blocked, g)
    w, s, scale = to_mlx_nvfp4(packed, blocked, g)
    got = np.array(mx.dequantize(w, s, group_size=16, bits=4, mode="nvfp4", dtype=mx.float32)) * np.float32(scale)
    same_bits(got, want)


def test_mlx_quantized_matmul_in_the_native_modes():
    rng = np.random.default_rng(9)
    rows, cols = 24, 128
    x = rng.standard_normal((3, cols)).astype(np.float32)
    codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    e8m0 = rng.integers(115, 135, size=(rows, cols // 32), dtype=np.uint8)
    blocked = block_scales(e8m0, rows, cols // 32)
    w, s = to_mlx_mxfp8(codes, blocked)
    ref = x.astype(np.float64) @ decode_mxfp8(codes, blocked).T.astype(np.float64)
    y = mx.quantized_matmul(mx.array(x), w, s, transpose=True, group_size=32, bits=8, mode="mxfp8")
    assert np.linalg.norm(np.array(y) - ref) / np.linalg.norm(ref) < 1e-5

    fp4 = rng.integers(0, 16, size=(rows, cols), dtype=np.uint8)
    packed = ((fp4[:, 0::2] << 4) | fp4[:, 1::2]).astype(np.uint8)
    e4m3 = rng.integers(0x20, 0x60, size=(rows, cols // 16), dtype=np.uint8)
    blocked = block_scales(e4m3, rows, cols // 16)
    w, s, g = to_mlx_nvfp4(packed, blocked, np.float32(0.01))
    ref = x.astype(np.float64) @ decode_nvfp4(packed, blocked, np.float32(0.01)).T.astype(np.float64)
    y = mx.quantized_matmul(mx.array(x), w, s, transpose=True, group_size=16, bits=4, mode="nvfp4") * g
    assert np.linalg.norm(np.array(y) - ref) / np.linalg.norm(ref) < 1e-5


def test_mlx_affine_int8_is_within_one_ulp():
    rng = np.random.default_rng(8)
    q = rng.integers(-128, 128, size=(16, 256), dtype=np.int8)
    scale = np.exp(rng.uniform(-9, 1, size=(16, 1))).astype(np.float32)
    w, s, b = to_mlx_int8(q, scale)
    got = np.array(mx.dequantize(w, s, b, group_size=128, bits=8, dtype=mx.float32))
    want = decode_int8(q, scale)
    assert (np.abs(got - want) <= np.spacing(256 * scale)).all()
