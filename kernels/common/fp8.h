// fp8.h: decoding of 8-bit float codes, per element, from the bit layouts (no lookup table).
//
//   float8_e4m3fn  sign | 4 exponent bits (bias 7) | 3 mantissa bits. No infinities; NaN only at 0x7F and
//                  0xFF. Largest finite 448.
//   float8_e5m2    sign | 5 exponent bits (bias 15) | 2 mantissa bits, IEEE style (all-ones exponent:
//                  infinity for mantissa 0, NaN otherwise). Largest finite 57344.
//
// An all-zero exponent field is a subnormal: mantissa * 2^(1 - bias - mantissa_bits). Every fp8 value is a
// float32, so normal codes are rebuilt as float32 bit patterns (exponent rebiased, mantissa moved to the top)
// and subnormals as an exact small-integer product: the decode is bit-exact. NaN codes decode to the
// canonical positive quiet NaN 0x7FC00000, whatever their sign, which is what the portable path's table
// (mlx_video.convert.fp8) holds, so the two paths agree bit for bit on all 256 codes.
//
// Requires mlxvid_shim.h.

#ifndef MLXVID_FP8_H
#define MLXVID_FP8_H

#define MLXVID_FP8_E4M3FN 0
#define MLXVID_FP8_E5M2 1
#define MLXVID_CANONICAL_NAN_BITS 0x7FC00000u

MLXVID_FUNC float mlxvid_fp8_e4m3fn_to_float(uint32_t code) {
  const uint32_t sign = (code & 0x80u) << 24;
  const uint32_t exponent = (code >> 3) & 0xFu;
  const uint32_t mantissa = code & 0x7u;
  if (exponent == 0xFu && mantissa == 0x7u) {
    return mlxvid_bits_to_float(MLXVID_CANONICAL_NAN_BITS);
  }
  if (exponent == 0u) {
    const float magnitude = float(mantissa) * 0.001953125f;  // 2^-9, exact
    return sign != 0u ? -magnitude : magnitude;
  }
  // float32 exponent = e - 7 + 127; the 3 mantissa bits become the top of the 23.
  return mlxvid_bits_to_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

MLXVID_FUNC float mlxvid_fp8_e5m2_to_float(uint32_t code) {
  const uint32_t sign = (code & 0x80u) << 24;
  const uint32_t exponent = (code >> 2) & 0x1Fu;
  const uint32_t mantissa = code & 0x3u;
  if (exponent == 0x1Fu) {
    return mantissa == 0u ? mlxvid_bits_to_float(sign | 0x7F800000u)
                          : mlxvid_bits_to_float(MLXVID_CANONICAL_NAN_BITS);
  }
  if (exponent == 0u) {
    const float magnitude = float(mantissa) * 1.52587890625e-05f;  // 2^-16, exact
    return sign != 0u ? -magnitude : magnitude;
  }
  // float32 exponent = e - 15 + 127; the 2 mantissa bits become the top of the 23.
  return mlxvid_bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 21));
}

// format: MLXVID_FP8_E4M3FN or MLXVID_FP8_E5M2.
MLXVID_FUNC float mlxvid_fp8_to_float(uint32_t code, int format) {
  return format == MLXVID_FP8_E5M2 ? mlxvid_fp8_e5m2_to_float(code) : mlxvid_fp8_e4m3fn_to_float(code);
}

// The dequantized value before narrowing to the output dtype: decode(code) * scale, in float32, which is
// how the portable path computes it (table lookup, float32 multiply, then astype).
MLXVID_FUNC float mlxvid_fp8_dequant_value(uint32_t code, int format, float scale) {
  return mlxvid_fp8_to_float(code, format) * scale;
}

#endif  // MLXVID_FP8_H
