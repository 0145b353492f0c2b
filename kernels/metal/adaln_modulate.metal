// Body of the Metal kernel "mlxvid_adaln_modulate": LayerNorm without affine, then xhat * (1 + scale) + shift.
// Inputs:  x (rows, dim), shift and scale (rows / rep, dim): modulation row r / rep applies to row r,
//          params (int32: dim, rep), eps (float32, 1).
// Output:  out (OutT, rows, dim). Template: OutT, TG (threads per threadgroup, a power of two).
// Grid: rows * TG threads in threadgroups of TG; one threadgroup per row. Mean, then the variance about
// it, by threadgroup reductions; then each thread writes its strided share of the row.
threadgroup float mlxvid_scratch[TG];
const uint32_t row = threadgroup_position_in_grid.x;
const uint32_t lid = thread_position_in_threadgroup.x;
const uint32_t dim = uint32_t(params[0]);
const uint32_t rep = uint32_t(params[1]);
const uint32_t base = row * dim;
const uint32_t mod_base = (row / rep) * dim;
float acc = 0.0f;
for (uint32_t j = lid; j < dim; j += TG) {
  acc += mlxvid_to_float(x[base + j]);
}
const float mean = mlxvid_group_sum(mlxvid_scratch, acc, lid, TG) / float(dim);
acc = 0.0f;
for (uint32_t j = lid; j < dim; j += TG) {
  const float d = mlxvid_to_float(x[base + j]) - mean;
  acc += d * d;
}
const float var = mlxvid_group_sum(mlxvid_scratch, acc, lid, TG) / float(dim);
const float inv_std = mlxvid_inv_std(var, eps[0]);
for (uint32_t j = lid; j < dim; j += TG) {
  const float xhat = mlxvid_normalize(mlxvid_to_float(x[base + j]), mean, inv_std);
  out[base + j] = mlxvid_from_float<OutT>(
      mlxvid_modulate(xhat, mlxvid_to_float(shift[mod_base + j]), mlxvid_to_float(scale[mod_base + j])));
}
