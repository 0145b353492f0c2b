// rope.h: rotary position embedding on interleaved channel pairs, driven by host-built cos/sin tables.
//
// A head of D channels holds D/2 pairs (x[2i], x[2i+1]); pair i of token l is rotated by the angle in the
// table entry chosen by mlxvid_rope_table_index:
//   y[2i]   = x[2i] * cos - x[2i+1] * sin
//   y[2i+1] = x[2i] * sin + x[2i+1] * cos
// computed in float32.
//
// Tables. The token sequence is a row-major grid of up to three axes (sizes s0, s1, s2) and the pairs of a
// head are split between the axes (p0 + p1 + p2 = D/2 pairs, axis 0 first). The table buffer holds, one
// after the other, an (s0, p0) table for axis 0, an (s1, p1) table for axis 1 and an (s2, p2) table for
// axis 2, each row-major. So
//   * Wan (t, h, w) with head_dim 128 uses the 3-axis form with pairs (22, 21, 21);
//   * HunyuanVideo uses pairs (8, 28, 28), any other split works the same way;
//   * a full per-token table (L, D/2), e.g. one with mixed per-pair frequencies, is the 1-axis form
//     s0 = L, p0 = D/2 (s1 = s2 = 1, p1 = p2 = 0).
// Unused axes have size 1 and 0 pairs.
//
// Requires mlxvid_shim.h.

#ifndef MLXVID_ROPE_H
#define MLXVID_ROPE_H

// Index of the cos/sin entry for pair `pair` of token `token`.
MLXVID_FUNC uint32_t mlxvid_rope_table_index(
    uint32_t token, uint32_t pair,
    uint32_t s0, uint32_t s1, uint32_t s2,
    uint32_t p0, uint32_t p1, uint32_t p2) {
  const uint32_t c2 = token % s2;
  const uint32_t c1 = (token / s2) % s1;
  const uint32_t c0 = token / (s1 * s2);
  if (pair < p0) {
    return c0 * p0 + pair;
  }
  if (pair < p0 + p1) {
    return s0 * p0 + c1 * p1 + (pair - p0);
  }
  return s0 * p0 + s1 * p1 + c2 * p2 + (pair - p0 - p1);
}

// Rotate one interleaved pair (x0, x1) by the angle whose cosine and sine are c and s.
MLXVID_FUNC void mlxvid_rope_pair(
    float x0, float x1, float c, float s, MLXVID_THREAD float& y0, MLXVID_THREAD float& y1) {
  y0 = x0 * c - x1 * s;
  y1 = x0 * s + x1 * c;
}

#endif  // MLXVID_ROPE_H
