// adaln.h: the per-element math of Wan's adaptive LayerNorm and gated residual, plus a threadgroup sum.
//
//   modulate:        LayerNorm without affine, then  xhat * (1 + scale) + shift
//   gated residual:  x + y * gate
// Both in float32, in the same operation order as the portable MLX composition.
//
// Requires mlxvid_shim.h.

#ifndef MLXVID_ADALN_H
#define MLXVID_ADALN_H

// 1 / sqrt(var + eps) with a correctly rounded square root and an IEEE division.
MLXVID_FUNC float mlxvid_inv_std(float var, float eps) {
  return 1.0f / mlxvid_sqrt(var + eps);
}

// The normalised value (x - mean) * inv_std.
MLXVID_FUNC float mlxvid_normalize(float x, float mean, float inv_std) {
  return (x - mean) * inv_std;
}

MLXVID_FUNC float mlxvid_modulate(float xhat, float shift, float scale) {
  return xhat * (1.0f + scale) + shift;
}

MLXVID_FUNC float mlxvid_gated_residual_value(float x, float gate, float y) {
  return x + y * gate;
}

// Sum of `value` over the `count` threads of a threadgroup / block (count a power of two, lid the thread's
// index in it), by a tree reduction in `scratch` (count floats of shared memory). Every thread gets the
// sum. Every thread of the group must call it, the same number of times.
MLXVID_FUNC float mlxvid_group_sum(MLXVID_SHARED float* scratch, float value, uint32_t lid, uint32_t count) {
  scratch[lid] = value;
  MLXVID_BARRIER();
  for (uint32_t stride = count / 2u; stride > 0u; stride /= 2u) {
    if (lid < stride) {
      scratch[lid] += scratch[lid + stride];
    }
    MLXVID_BARRIER();
  }
  const float total = scratch[0];
  MLXVID_BARRIER();  // scratch may be reused right after
  return total;
}

#endif  // MLXVID_ADALN_H
