// Body of the CUDA kernel "mlxvid_rope_qk": rotary embedding of q and k (both B, L, H, D) in one launch.
// Inputs:  q, k (OutT), cos_table, sin_table (float32, see common/rope.h), params (int32, as for
//          "mlxvid_rope"). Outputs: q_out, k_out (OutT). Template: OutT.
// Grid: (pairs, 2, 1); y = 0 rotates q, y = 1 rotates k.
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
const float c = cos_table[t];
const float s = sin_table[t];
float y0;
float y1;
if (blockIdx.y * blockDim.y + threadIdx.y == 0) {
  mlxvid_rope_pair(mlxvid_to_float(q[2 * i]), mlxvid_to_float(q[2 * i + 1]), c, s, y0, y1);
  q_out[2 * i] = mlxvid_from_float<OutT>(y0);
  q_out[2 * i + 1] = mlxvid_from_float<OutT>(y1);
} else {
  mlxvid_rope_pair(mlxvid_to_float(k[2 * i]), mlxvid_to_float(k[2 * i + 1]), c, s, y0, y1);
  k_out[2 * i] = mlxvid_from_float<OutT>(y0);
  k_out[2 * i + 1] = mlxvid_from_float<OutT>(y1);
}
