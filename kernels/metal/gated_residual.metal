// Body of the Metal kernel "mlxvid_gated_residual": out = x + y * gate.
// Inputs:  x, y (rows, dim), gate (rows / rep, dim): gate row r / rep applies to row r,
//          params (int32: n = rows * dim, dim, rep).
// Output:  out (OutT, rows, dim). Template: OutT. Grid: n threads, one element each.
const uint32_t i = thread_position_in_grid.x;
if (i >= uint32_t(params[0])) {
  return;
}
const uint32_t dim = uint32_t(params[1]);
const uint32_t rep = uint32_t(params[2]);
const uint32_t g = (i / dim / rep) * dim + i % dim;
out[i] = mlxvid_from_float<OutT>(
    mlxvid_gated_residual_value(mlxvid_to_float(x[i]), mlxvid_to_float(gate[g]), mlxvid_to_float(y[i])));
