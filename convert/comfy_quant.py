"""Exact decoders for the block-scaled `comfy_quant` formats of ComfyUI: nvfp4, mxfp8 and int8_tensorwise.

ComfyUI marks a quantized Linear `<layer>` with a `<layer>.comfy_quant` uint8 tensor holding JSON
(`{"format": ...}`, extra fields either flat or under `"params"`) and stores, as written by comfy-kitchen's
layouts (`comfy_kitchen/tensor/{nvfp4,mxfp8,int8}.py`, `backends/eager/quantization.py`) and loaded by
`comfy/ops.py` with the logical shape (out_features, in_features) of the module:

* **nvfp4** -- `<layer>.weight`: uint8 (rows, cols / 2), two float4 e2m1 codes per byte, the FIRST element
  of each pair in the HIGH nibble; rows and cols padded with zeros to multiples of 16.
  `<layer>.weight_scale`: float8 e4m3fn, one per 16 consecutive elements of a row, in cuBLAS's blocked
  ("swizzled") layout (see `unblock_scales`), shape (roundup(rows, 128), roundup(cols / 16, 4)).
  `<layer>.weight_scale_2`: float32 scalar, the per-tensor decode multiplier.
  value = e2m1(code) * e4m3(block scale) * weight_scale_2.
* **mxfp8** -- `<layer>.weight`: float8 e4m3fn codes (rows, cols), both padded to multiples of 32.
  `<layer>.weight_scale`: e8m0 (stored as U8 or F8_E8M0), one per 32 elements of a row, blocked like
  nvfp4's, shape (roundup(rows, 128), roundup(cols / 32, 4)). value = e4m3(code) * 2 ** (scale - 127).
* **int8_tensorwise** -- `<layer>.weight`: int8 (rows, cols). `<layer>.weight_scale`: float32, a scalar
  (one scale per tensor) or (rows, 1) (one per row). value = code * scale. With `"convrot": true` the
  stored weight is W @ H^T per group of `convrot_groupsize` (default 256) input columns, H the normalized
  regular Hadamard matrix of that size (Kronecker powers of [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]],
  divided by sqrt(size)); H is symmetric and orthogonal, so W = stored @ H^T again.

Element formats (OCP Microscaling Formats v1.0 for e2m1 and e8m0):

* e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal (0 or 0.5). The
  16 values are +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; no infinities or NaN.
* e8m0: 2 ** (code - 127) for codes 0..254 (code 0 is 2 ** -127, a float32 subnormal), NaN for 0xFF.
  (comfy-kitchen's own `e8m0_to_f32` reads code 0 as 0.0 and 0xFF as +inf; its quantizer writes code 0
  only for all-zero blocks, so the decoded weights agree.)
* e4m3fn: see `convert/fp8.py`.

All decodes here return float32 and are exact: each value is the float32 rounding of the real-number
formula (e2m1 * e4m3 is formed exactly first and the per-tensor scale applied once; the ConvRot rotation
is summed in integers). comfy-kitchen's own eager dequantization rounds in its output dtype and in a
float matmul, so it can differ from these by rounding.

MLX's own modes (mlx 0.32): "mxfp8" holds mxfp8 codes and scales as they are (`to_mlx_mxfp8`; exact, but
MLX reads scale 0xFF as inf, not NaN); "nvfp4" holds the e2m1 codes and e4m3 block scales (`to_mlx_nvfp4`;
exact) while the per-tensor scale multiplies the result, since `quantized_matmul` takes no global scale;
int8_tensorwise only fits the 8-bit affine mode approximately (`to_mlx_int8`), and ConvRot weights not at all.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError

from .fp8 import fp8_table

FORMATS = ("nvfp4", "mxfp8", "int8_tensorwise")
NVFP4_GROUP = 16
MXFP8_GROUP = 32
DEFAULT_CONVROT_GROUP = 256


def _e2m1_table() -> np.ndarray:
    codes = np.arange(16)
    sign = np.where(codes & 8, -1.0, 1.0)
    exp, man = (codes >> 1) & 3, codes & 1
    magnitude = np.where(exp == 0, man * 0.5, (1 + man / 2) * 2.0 ** (exp - 1))
    return (sign * magnitude).astype(np.float32)


def _e8m0_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    bits = np.where(codes == 0, np.uint32(1 << 22), codes << 23)  # the exponent field itself; code 0: 2**-127
    table = bits.astype(np.uint32).view(np.float32).copy()
    table[255] = np.nan
    return table


E2M1 = _e2m1_table()
E8M0 = _e8m0_table()
E2M1.setflags(write=False)
E8M0.setflags(write=False)


def parse_config(blob) -> dict:
    """A `<layer>.comfy_quant` tensor (uint8 JSON bytes) or string -> {"format": ..., other fields}, with
    fields nested under "params" lifted to the top (ComfyUI reads both places)."""
    if not isinstance(blob, (str, bytes)):
        blob = np.asarray(blob).astype(np.uint8).tobytes()
    try:
        conf = json.loads(blob)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MlxVideoError("a comfy_quant entry is not JSON") from None
    if not isinstance(conf, dict) or "format" not in conf:
        raise MlxVideoError(f"a comfy_quant entry has no format: {conf!r}")
    params = conf.get("params")
    merged = {**(params if isinstance(params, dict) else {}), **{k: v for k, v in conf.items() if k != "params"}}
    return merged


def unblock_scales(blocked: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """cuBLAS's blocked layout of a (rows, cols) scale matrix -> the plain (rows, cols) matrix.

    The matrix is padded to whole tiles of 128 rows x 4 columns; tiles are stored one after another, row
    tiles outer; inside a tile, the scale of (row r, column c) sits at byte (r % 32) * 16 + (r // 32) * 4 + c.
    """
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    flat = np.ascontiguousarray(blocked).reshape(-1)
    if flat.size != row_tiles * col_tiles * 512:
        raise MlxVideoError(
            f"block scales hold {flat.size} entries; a ({rows}, {cols}) scale grid in 128x4 tiles needs "
            f"{row_tiles * col_tiles * 512}"
        )
    tiles = flat.reshape(row_tiles, col_tiles, 32, 4, 4)  # [row tile, col tile, r % 32, r // 32, c]
    plain = tiles.transpose(0, 3, 2, 1, 4).reshape(row_tiles * 128, col_tiles * 4)
    return plain[:rows, :cols]


def block_scales(blocked: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The inverse of `unblock_scales` (pads with zeros); for writing test files and for round trips."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = np.zeros((row_tiles * 128, col_tiles * 4), dtype=np.asarray(blocked).dtype)
    padded[:rows, :cols] = blocked
    tiles = padded.reshape(row_tiles, 4, 32, col_tiles, 4).transpose(0, 3, 2, 1, 4)
    return np.ascontiguousarray(tiles).reshape(row_tiles * 128, col_tiles * 4)


def _logical(shape, stored: tuple[int, int], what: str) -> tuple[int, int]:
    rows, cols = stored if shape is None else (int(shape[0]), int(shape[1]))
    if rows > stored[0] or cols > stored[1]:
        raise MlxVideoError(f"{what}: the logical shape ({rows}, {cols}) is larger than the stored {stored}")
    return rows, cols


def _u8(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.int8:
        a = a.view(np.uint8)
    if a.dtype != np.uint8:
        raise MlxVideoError(f"expected raw uint8 codes, got {a.dtype}")
    return a


def nvfp4_codes(packed: np.ndarray) -> np.ndarray:
    """(rows, cols / 2) bytes -> (rows, cols) e2m1 codes; the high nibble holds the first element."""
    packed = _u8(packed)
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(packed.shape[0], -1)


def decode_nvfp4(packed, block_scale, tensor_scale, shape=None) -> np.ndarray:
    """nvfp4 weight bytes, blocked e4m3 block scales (uint8 codes) and the float32 per-tensor scale ->
    float32 of the logical `shape` (default: the whole stored, padded matrix)."""
    codes = nvfp4_codes(packed)
    stored = codes.shape
    if stored[1] % NVFP4_GROUP:
        raise MlxVideoError(f"nvfp4 rows of {stored[1]} elements are not whole groups of {NVFP4_GROUP}")
    rows, cols = _logical(shape, stored, "nvfp4")
    scales = fp8_table("e4m3fn")[unblock_scales(_u8(block_scale), stored[0], stored[1] // NVFP4_GROUP)]
    exact = E2M1[codes].reshape(stored[0], -1, NVFP4_GROUP) * scales[:, :, None]  # <= 6 significant bits: exact
    g = np.float32(np.asarray(tensor_scale, dtype=np.float32).reshape(()))
    with np.errstate(over="ignore", invalid="ignore"):
        values = (exact * g).reshape(stored)
    return values[:rows, :cols]


def decode_mxfp8(codes, block_scale, shape=None) -> np.ndarray:
    """mxfp8 e4m3 codes (uint8) and blocked e8m0 scales (uint8) -> float32 of the logical `shape`."""
    codes = _u8(codes)
    stored = codes.shape
    if len(stored) != 2 or stored[1] % MXFP8_GROUP:
        raise MlxVideoError(f"mxfp8 weights must be 2-D with rows of whole groups of {MXFP8_GROUP}, got {stored}")
    rows, cols = _logical(shape, stored, "mxfp8")
    scales = E8M0[unblock_scales(_u8(block_scale), stored[0], stored[1] // MXFP8_GROUP)]
    with np.errstate(over="ignore", invalid="ignore"):
        values = fp8_table("e4m3fn")[codes].reshape(stored[0], -1, MXFP8_GROUP) * scales[:, :, None]
    return values.reshape(stored)[:rows, :cols]


def hadamard_signs(size: int) -> np.ndarray:
    """The +-1 regular Hadamard matrix of a power-of-4 `size` (ConvRot's H times sqrt(size))."""
    if size < 4 or size & (size - 1) or (size.bit_length() - 1) % 2:
        raise MlxVideoError(f"a ConvRot group size must be a power of 4, got {size}")
    h4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=np.int32)
    h = h4
    while h.shape[0] < size:
        h = np.kron(h, h4)
    return h


def decode_int8(codes, scale, convrot: bool = False, group_size: int = DEFAULT_CONVROT_GROUP) -> np.ndarray:
    """int8_tensorwise: codes (rows, cols) int8 and a scalar or per-row float32 scale -> float32.

    With `convrot` the rotation is undone exactly: per group the integer sums codes @ H_signs^T are
    formed first, then multiplied by scale / sqrt(group_size) (a power of two) with one rounding.
    """
    q = np.asarray(codes)
    if q.dtype == np.uint8:
        q = q.view(np.int8)
    if q.dtype != np.int8 or q.ndim != 2:
        raise MlxVideoError(f"int8_tensorwise weights must be a 2-D int8 array, got {q.dtype} {q.shape}")
    s = np.asarray(scale, dtype=np.float32)
    if s.size == 1:
        s = s.reshape(1, 1)
    elif s.size == q.shape[0]:
        s = s.reshape(-1, 1)
    else:
        raise MlxVideoError(f"an int8_tensorwise scale of shape {s.shape} fits neither one tensor nor {q.shape[0]} rows")
    if not convrot:
        return q.astype(np.float32) * s
    rows, cols = q.shape
    if cols % group_size:
        raise MlxVideoError(f"ConvRot groups of {group_size} do not divide rows of {cols}")
    h = hadamard_signs(group_size)
    sums = q.astype(np.int32).reshape(rows, -1, group_size) @ h.T  # |sum| <= 128 * size: exact
    unit = s.astype(np.float64) * 2.0 ** -((group_size.bit_length() - 1) // 2)
    return (sums.reshape(rows, cols).astype(np.float64) * unit).astype(np.float32)


def stored_shape_to_padded(fmt: str, weight_shape) -> tuple[int, int]:
    """The (padded) logical matrix a stored comfy_quant weight holds: nvfp4 packs two codes per byte."""
    rows, cols = (int(d) for d in weight_shape)
    return (rows, 2 * cols) if fmt == "nvfp4" else (rows, cols)


def dequantize(fmt: str, weight, scales: dict, config: dict | None = None, shape=None) -> np.ndarray:
    """Decode one comfy_quant weight. `scales` maps the side-tensor suffixes (`weight_scale`,
    `weight_scale_2`) to their arrays (fp8/e8m0 as uint8 codes); `config` is the parsed comfy_quant entry."""
    config = config or {}
    if fmt == "nvfp4":
        return decode_nvfp4(weight, scales["weight_scale"], scales["weight_scale_2"], shape)
    if fmt == "mxfp8":
        return decode_mxfp8(weight, scales["weight_scale"], shape)
    if fmt == "int8_tensorwise":
        values = decode_int8(
            weight,
            scales["weight_scale"],
            bool(config.get("convrot", False)),
            int(config.get("convrot_groupsize", DEFAULT_CONVROT_GROUP)),
        )
        return values if shape is None else values[: shape[0], : shape[1]]
    raise MlxVideoError(f"comfy_quant format {fmt!r} is not one mlxvid decodes ({', '.join(FORMATS)})")


# ---------------------------------------------------------------------------------------------------
# MLX native forms


def _pack_bytes_lsb(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) codes of 4 or 8 bits -> MLX's uint32 words, element 0 in the lowest bits."""
    per = 32 // bits
    lanes = codes.astype(np.uint32).reshape(codes.shape[0], -1, per) << (bits * np.arange(per, dtype=np.uint32))
    return np.bitwise_or.reduce(lanes, axis=-1)


def to_mlx_mxfp8(codes, block_scale, shape=None) -> tuple[mx.array, mx.array]:
    """(weight, scales) for `mx.dequantize(..., mode="mxfp8")` / `mx.quantized_matmul(..., mode="mxfp8")`:
    the same e4m3 codes and e8m0 scales, exact (MLX reads scale 0xFF as inf where the spec says NaN)."""
    codes = _u8(codes)
    rows, cols = _logical(shape, codes.shape, "mxfp8")
    if cols % MXFP8_GROUP:
        raise MlxVideoError(f"mxfp8 with {cols} columns has no MLX form (needs a multiple of {MXFP8_GROUP})")
    scales = unblock_scales(_u8(block_scale), codes.shape[0], codes.shape[1] // MXFP8_GROUP)
    weight = _pack_bytes_lsb(codes[:rows, :cols], 8)
    return mx.array(weight), mx.array(np.ascontiguousarray(scales[:rows, : cols // MXFP8_GROUP]))


def to_mlx_nvfp4(packed, block_scale, tensor_scale, shape=None) -> tuple[mx.array, mx.array, float]:
    """(weight, scales, tensor_scale) for MLX's "nvfp4" mode. `mx.dequantize(weight, scales, mode="nvfp4")`
    gives e2m1 * e4m3 exactly; multiply by `tensor_scale` afterwards (or scale the matmul's output) to get
    `decode_nvfp4`. MLX's own `global_scale` argument follows another convention (it divides by 6 * 448)
    and `quantized_matmul` has none, so the per-tensor scale stays outside."""
    codes = nvfp4_codes(packed)
    rows, cols = _logical(shape, codes.shape, "nvfp4")
    if cols % NVFP4_GROUP:
        raise MlxVideoError(f"nvfp4 with {cols} columns has no MLX form (needs a multiple of {NVFP4_GROUP})")
    scales = unblock_scales(_u8(block_scale), codes.shape[0], codes.shape[1] // NVFP4_GROUP)
    weight = _pack_bytes_lsb(codes[:rows, :cols], 4)
    g = float(np.asarray(tensor_scale, dtype=np.float32).reshape(()))
    return mx.array(weight), mx.array(np.ascontiguousarray(scales[:rows, : cols // NVFP4_GROUP])), g


def to_mlx_int8(codes, scale, group_size: int = 128) -> tuple[mx.array, mx.array, mx.array]:
    """(weight, scales, biases) of MLX's 8-bit affine mode for a plain (not ConvRot) int8_tensorwise weight:
    code + 128 with scale s and bias -128 s. NOT exact: MLX forms s * (code + 128) and then adds the bias,
    two float32 roundings, so a value may differ from `decode_int8` by up to one float32 ulp of 256 * |s|
    (a relative 1e-7 of the row's largest possible value)."""
    q = np.asarray(codes)
    if q.dtype == np.uint8:
        q = q.view(np.int8)
    rows, cols = q.shape
    if cols % group_size:
        raise MlxVideoError(f"int8 rows of {cols} are not whole groups of {group_size}")
    s = np.asarray(scale, dtype=np.float32)
    s = np.broadcast_to(s.reshape(-1, 1) if s.size == rows else s.reshape(1, 1), (rows, cols // group_size))
    weight = _pack_bytes_lsb((q.astype(np.int16) + 128).astype(np.uint8), 8)
    return mx.array(weight), mx.array(np.ascontiguousarray(s)), mx.array(np.ascontiguousarray(-128 * s))
