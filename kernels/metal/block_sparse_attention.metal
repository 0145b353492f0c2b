// Body of the Metal kernel "mlxvid_block_sparse_attention": softmax attention of each query over only the key
// tiles its query tile keeps (a block-sparse mask, e.g. radial attention's), with an online softmax: no score
// outside a kept tile is computed and no score matrix is stored.
// Inputs:  q (BH, Lq, D), k and v (BH, Lk, D) for B * heads (batch, head) pairs; key_bias (B, Lk) float32 added to
//          every score of a key (0, or -inf for a masked key); tile_ptr (query tiles + 1) and tile_idx int32: the
//          kept key tiles of query tile t are tile_idx[tile_ptr[t]] .. tile_idx[tile_ptr[t + 1] - 1];
//          params (int32: Lq, Lk, tile, heads); scale (float32, 1).
// Output:  out (OutT, BH, Lq, D). Template: OutT, D (the head width).
// Grid: (Lq, BH) threads, one per query row and (batch, head) pair.
const uint32_t row = thread_position_in_grid.x;
const uint32_t bh = thread_position_in_grid.y;
const uint32_t q_len = uint32_t(params[0]);
const uint32_t k_len = uint32_t(params[1]);
const uint32_t tile = uint32_t(params[2]);
const uint32_t heads = uint32_t(params[3]);
if (row < q_len) {
  const uint32_t q_base = (bh * q_len + row) * D;
  const uint32_t bias_base = (bh / heads) * k_len;
  float qs[D];
  float acc[D];
  for (uint32_t d = 0; d < D; ++d) {
    qs[d] = mlxvid_to_float(q[q_base + d]) * scale[0];
    acc[d] = 0.0f;
  }
  float m = mlxvid_negative_infinity();
  float l = 0.0f;
  const uint32_t query_tile = row / tile;
  for (int32_t t = tile_ptr[query_tile]; t < tile_ptr[query_tile + 1]; ++t) {
    const uint32_t start = uint32_t(tile_idx[t]) * tile;
    const uint32_t stop = start + tile < k_len ? start + tile : k_len;
    for (uint32_t j = start; j < stop; ++j) {
      const uint32_t kv_base = (bh * k_len + j) * D;
      float s = 0.0f;
      for (uint32_t d = 0; d < D; ++d) {
        s += qs[d] * mlxvid_to_float(k[kv_base + d]);
      }
      float rescale;
      const float p = mlxvid_softmax_fold(s + key_bias[bias_base + j], m, l, rescale);
      for (uint32_t d = 0; d < D; ++d) {
        acc[d] = acc[d] * rescale + p * mlxvid_to_float(v[kv_base + d]);
      }
    }
  }
  for (uint32_t d = 0; d < D; ++d) {
    out[q_base + d] = mlxvid_from_float<OutT>(mlxvid_softmax_finish(acc[d], l));
  }
}
