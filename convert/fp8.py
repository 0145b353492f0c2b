"""Exact decoding (and, for tests and quantization, encoding) of 8-bit floating point codes.

MLX has no fp8 dtype, so fp8 weights travel as raw uint8 codes (that is how our safetensors and .pth
readers hand them over) and are decoded here through a 256-entry float32 table. The tables are built
from the bit layouts, not copied from anywhere:

* float8_e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. No infinities; the only
  non-finite codes are NaN at 0x7F and 0xFF (exponent and mantissa all ones). Largest finite: 448.
* float8_e5m2: 1 sign bit, 5 exponent bits (bias 15), 2 mantissa bits, IEEE-754 style: an all-ones
  exponent means infinity (mantissa 0) or NaN (mantissa != 0). Largest finite: 57344.

In both, an all-zero exponent field encodes subnormals: mantissa * 2**(1 - bias - mantissa_bits).
Every fp8 value is exactly representable in float32, so decoding is bit-exact.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlx_video.errors import MlxVideoError

FORMATS = ("e4m3fn", "e5m2")

# name -> (exponent bits, mantissa bits, "fn" = finite-only with NaN at all-ones)
_LAYOUTS = {
    "e4m3fn": (4, 3, True),
    "e5m2": (5, 2, False),
}

E4M3FN_MAX = 448.0


def _decode_code(code: int, exp_bits: int, man_bits: int, finite_only: bool) -> float:
    sign = -1.0 if code >> 7 else 1.0
    exp_field = (code >> man_bits) & ((1 << exp_bits) - 1)
    man_field = code & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    exp_all_ones = exp_field == (1 << exp_bits) - 1
    if finite_only:
        # Only the single pattern with every exponent and mantissa bit set is special (NaN); the rest
        # of the top binade holds ordinary finite numbers.
        if exp_all_ones and man_field == (1 << man_bits) - 1:
            return math.nan
    elif exp_all_ones:
        return sign * math.inf if man_field == 0 else math.nan
    if exp_field == 0:  # zero and subnormals: no implicit leading one, exponent pinned at 1 - bias
        return sign * math.ldexp(man_field, 1 - bias - man_bits)
    return sign * math.ldexp((1 << man_bits) + man_field, exp_field - bias - man_bits)


def _build_table(fmt: str) -> np.ndarray:
    exp_bits, man_bits, finite_only = _LAYOUTS[fmt]
    table = np.array([_decode_code(c, exp_bits, man_bits, finite_only) for c in range(256)], dtype=np.float64)
    out = table.astype(np.float32)
    # The float64 -> float32 narrowing must be lossless: every fp8 value fits in float32 exactly.
    finite = np.isfinite(table)
    assert np.array_equal(out[finite].astype(np.float64), table[finite])
    return out


# float32 numpy tables, indexed by code; kept read-only so nobody corrupts them by accident.
_NP_TABLES: dict[str, np.ndarray] = {}
for _fmt in FORMATS:
    _t = _build_table(_fmt)
    _t.setflags(write=False)
    _NP_TABLES[_fmt] = _t
del _fmt, _t

_MX_TABLES: dict[str, mx.array] = {}


def _check_fmt(fmt: str) -> str:
    if fmt not in _LAYOUTS:
        raise MlxVideoError(f"unknown fp8 format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def fp8_table(fmt: str) -> np.ndarray:
    """The 256 decoded values of `fmt` ("e4m3fn" or "e5m2") as a read-only float32 numpy array."""
    return _NP_TABLES[_check_fmt(fmt)]


def _mx_table(fmt: str) -> mx.array:
    table = _MX_TABLES.get(fmt)
    if table is None:
        table = _MX_TABLES[fmt] = mx.array(_NP_TABLES[fmt])
    return table


def decode_fp8(codes: mx.array, fmt: str) -> mx.array:
    """Decode raw fp8 codes (a uint8 array, any shape) of format `fmt` to float32, bit-exactly."""
    table = _mx_table(_check_fmt(fmt))
    if not isinstance(codes, mx.array):
        codes = mx.array(np.asarray(codes))
    if codes.dtype == mx.int8:  # the same bytes, seen as signed
        codes = codes.view(mx.uint8)
    if codes.dtype != mx.uint8:
        raise MlxVideoError(f"fp8 codes must be a uint8 array of raw bytes, got {codes.dtype}")
    return mx.take(table, codes)


def as_scale(scale, codes_shape: tuple[int, ...]) -> mx.array:
    if isinstance(scale, mx.array):
        s = scale.astype(mx.float32)
    else:
        s = mx.array(np.asarray(scale, dtype=np.float32))
    if s.size == 1:
        return s.reshape(())
    if s.ndim == 1 and len(codes_shape) >= 1 and s.shape[0] == codes_shape[0]:
        # one scale per output channel (dim 0, PyTorch's Linear/Conv weight layout)
        return s.reshape((s.shape[0],) + (1,) * (len(codes_shape) - 1))
    try:
        if tuple(np.broadcast_shapes(tuple(s.shape), codes_shape)) == codes_shape:
            return s
    except ValueError:
        pass
    raise MlxVideoError(
        f"fp8 scale of shape {list(s.shape)} does not fit a weight of shape {list(codes_shape)}: "
        "expected a scalar or one scale per output channel"
    )


def dequantize_fp8(codes: mx.array, fmt: str, scale=1.0, dtype=mx.bfloat16) -> mx.array:
    """`decode_fp8(codes) * scale`, computed in float32 and then cast to `dtype`.

    `scale` may be a Python number, a 0-d or single-element array (per tensor), a 1-D array with one
    entry per output channel (dim 0 of `codes`), or any array that broadcasts to `codes`' shape.
    """
    values = decode_fp8(codes, fmt)
    out = values * as_scale(scale, tuple(values.shape))
    return out.astype(dtype)


def encode_e4m3fn(x: np.ndarray) -> np.ndarray:
    """Encode values as float8_e4m3fn codes (uint8), matching PyTorch's `.to(torch.float8_e4m3fn)`.

    Input is first taken as float32 (like PyTorch's conversion routine). Rounding is to nearest, ties to
    even, including in the subnormal range; the sign of zero is kept. Magnitudes beyond the largest
    finite value saturate to +-448 -- infinities too, as torch 2.13 does -- and NaN becomes 0x7F with
    its sign bit kept.
    """
    x = np.asarray(x, dtype=np.float32)
    sign = np.signbit(x).astype(np.uint8) << 7
    nan = np.isnan(x)
    a = np.minimum(np.abs(np.where(nan, np.float32(0), x)), np.float32(E4M3FN_MAX))
    # Unbiased exponent of each value, floored at that of the smallest normal (2**-6): below it the
    # quantum stays 2**-9 (subnormals). With 3 mantissa bits the quantum of binade e is 2**(e - 3).
    _, frexp_exp = np.frexp(a)  # a = m * 2**frexp_exp with m in [0.5, 1)
    e = np.where(a < np.float32(2.0**-6), -6, frexp_exp.astype(np.int32) - 1)
    q = np.rint(np.ldexp(a, (3 - e).astype(np.int32)))  # exact power-of-two scaling, then ties-to-even
    # Binade e >= -6 holds codes (e + 6) * 8 + q with q in [8, 16) (q == 16 carries into the next
    # binade, which this formula already gives); for e == -6 and q < 8 it is the subnormal code q.
    code = (e + 6) * 8 + q.astype(np.int32)
    code = np.where(nan, 0x7F, code).astype(np.uint8)
    return code | sign
