// Body of the CUDA kernel "mlxvid_fp8_dequant" (mx.fast.cuda_kernel writes the signature).
// Inputs:  codes (uint8, n raw fp8 bytes), scale (float32, n / cols entries), params (int32: n, cols).
// Output:  out (OutT, n) = decode(codes[i]) * scale[i / cols]: cols = n for one scale per tensor, the row
//          length for one scale per output channel (dim 0).
// Template: OutT (output dtype), FORMAT (0 = e4m3fn, 1 = e5m2). Grid: n threads, one element each.
const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
const uint32_t n = uint32_t(params[0]);
if (i >= n) {
  return;
}
const uint32_t cols = uint32_t(params[1]);
out[i] = mlxvid_from_float<OutT>(mlxvid_fp8_dequant_value(uint32_t(codes[i]), FORMAT, scale[i / cols]));
