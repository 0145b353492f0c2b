// Body of the CUDA kernel "mlxvid_rope": rotary embedding of one tensor x (B, L, H, D), interleaved pairs.
// Inputs:  x (OutT), cos_table and sin_table (float32, see common/rope.h for the axis layout),
//          params (int32: pairs = B*L*H*D/2, L, H, D/2, s0, s1, s2, p0, p1, p2).
// Output:  out (OutT, same shape as x). Template: OutT. Grid: one thread per pair.
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
if (i >= uint32_t(params[0])) {
  return;
}
const uint32_t tokens = uint32_t(params[1]);
const uint32_t heads = uint32_t(params[2]);
const uint32_t pairs = uint32_t(params[3]);
const uint32_t pair = i % pairs;
const uint32_t token = (i / (pairs * heads)) % tokens;
const uint32_t t = mlxvid_rope_table_index(
    token, pair, uint32_t(params[4]), uint32_t(params[5]), uint32_t(params[6]),
    uint32_t(params[7]), uint32_t(params[8]), uint32_t(params[9]));
float y0;
float y1;
mlxvid_rope_pair(mlxvid_to_float(x[2 * i]), mlxvid_to_float(x[2 * i + 1]), cos_table[t], sin_table[t], y0, y1);
out[2 * i] = mlxvid_from_float<OutT>(y0);
out[2 * i + 1] = mlxvid_from_float<OutT>(y1);
