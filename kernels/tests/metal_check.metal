// metal_check.metal: a build check of the Metal kernel sources, compiled on macOS by CMakeLists.txt with
// `xcrun -sdk macosx metal` (nothing runs the result). It reproduces what mx.fast.metal_kernel compiles:
// MLX's prelude (metal_stdlib, `using namespace metal`, bfloat16_t), then the header string that
// mlx_video/kernels.py assembles (backend define, shim, shared headers), then each body inside a signature
// of the kind MLX generates, instantiated for the output dtypes the dispatch layer uses.
#include <metal_stdlib>
using namespace metal;
typedef bfloat bfloat16_t;  // as MLX's bf16.h does on Metal 3.1 and later

#define MLXVID_BACKEND_METAL 1
#include "../common/mlxvid_shim.h"
#include "../common/fp8.h"
#include "../common/rope.h"
#include "../common/adaln.h"
#include "../common/sparse_attention.h"

template <typename OutT, int FORMAT>
[[kernel]] void custom_kernel_mlxvid_fp8_dequant(
    const device uint8_t* codes [[buffer(0)]],
    const device float* scale [[buffer(1)]],
    const constant int32_t* params [[buffer(2)]],
    device OutT* out [[buffer(3)]],
    uint3 thread_position_in_grid [[thread_position_in_grid]]) {
#include "../metal/fp8_dequant.metal"
}

template <typename OutT>
[[kernel]] void custom_kernel_mlxvid_rope(
    const device OutT* x [[buffer(0)]],
    const device float* cos_table [[buffer(1)]],
    const device float* sin_table [[buffer(2)]],
    const device int32_t* params [[buffer(3)]],
    device OutT* out [[buffer(4)]],
    uint3 thread_position_in_grid [[thread_position_in_grid]]) {
#include "../metal/rope.metal"
}

template <typename OutT>
[[kernel]] void custom_kernel_mlxvid_rope_qk(
    const device OutT* q [[buffer(0)]],
    const device OutT* k [[buffer(1)]],
    const device float* cos_table [[buffer(2)]],
    const device float* sin_table [[buffer(3)]],
    const device int32_t* params [[buffer(4)]],
    device OutT* q_out [[buffer(5)]],
    device OutT* k_out [[buffer(6)]],
    uint3 thread_position_in_grid [[thread_position_in_grid]]) {
#include "../metal/rope_qk.metal"
}

template <typename OutT, int TG, typename InT>
[[kernel]] void custom_kernel_mlxvid_adaln_modulate(
    const device InT* x [[buffer(0)]],
    const device InT* shift [[buffer(1)]],
    const device InT* scale [[buffer(2)]],
    const constant int32_t* params [[buffer(3)]],
    const constant float* eps [[buffer(4)]],
    device OutT* out [[buffer(5)]],
    uint3 thread_position_in_threadgroup [[thread_position_in_threadgroup]],
    uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]) {
#include "../metal/adaln_modulate.metal"
}

template <typename OutT, typename YT>
[[kernel]] void custom_kernel_mlxvid_gated_residual(
    const device float* x [[buffer(0)]],
    const device float* gate [[buffer(1)]],
    const device YT* y [[buffer(2)]],
    const constant int32_t* params [[buffer(3)]],
    device OutT* out [[buffer(4)]],
    uint3 thread_position_in_grid [[thread_position_in_grid]]) {
#include "../metal/gated_residual.metal"
}

template <typename OutT, int D>
[[kernel]] void custom_kernel_mlxvid_block_sparse_attention(
    const device OutT* q [[buffer(0)]],
    const device OutT* k [[buffer(1)]],
    const device OutT* v [[buffer(2)]],
    const device float* key_bias [[buffer(3)]],
    const device int32_t* tile_ptr [[buffer(4)]],
    const device int32_t* tile_idx [[buffer(5)]],
    const constant int32_t* params [[buffer(6)]],
    const constant float* scale [[buffer(7)]],
    device OutT* out [[buffer(8)]],
    uint3 thread_position_in_grid [[thread_position_in_grid]]) {
#include "../metal/block_sparse_attention.metal"
}

#define INSTANTIATE(host, fn, ...) \
  template [[host_name(host)]] [[kernel]] decltype(fn<__VA_ARGS__>) fn<__VA_ARGS__>;

INSTANTIATE("fp8_e4m3fn_f32", custom_kernel_mlxvid_fp8_dequant, float, 0)
INSTANTIATE("fp8_e4m3fn_f16", custom_kernel_mlxvid_fp8_dequant, half, 0)
INSTANTIATE("fp8_e4m3fn_bf16", custom_kernel_mlxvid_fp8_dequant, bfloat16_t, 0)
INSTANTIATE("fp8_e5m2_f32", custom_kernel_mlxvid_fp8_dequant, float, 1)
INSTANTIATE("fp8_e5m2_f16", custom_kernel_mlxvid_fp8_dequant, half, 1)
INSTANTIATE("fp8_e5m2_bf16", custom_kernel_mlxvid_fp8_dequant, bfloat16_t, 1)
INSTANTIATE("rope_f32", custom_kernel_mlxvid_rope, float)
INSTANTIATE("rope_f16", custom_kernel_mlxvid_rope, half)
INSTANTIATE("rope_bf16", custom_kernel_mlxvid_rope, bfloat16_t)
INSTANTIATE("rope_qk_f32", custom_kernel_mlxvid_rope_qk, float)
INSTANTIATE("rope_qk_f16", custom_kernel_mlxvid_rope_qk, half)
INSTANTIATE("rope_qk_bf16", custom_kernel_mlxvid_rope_qk, bfloat16_t)
INSTANTIATE("adaln_f32_256", custom_kernel_mlxvid_adaln_modulate, float, 256, float)
INSTANTIATE("adaln_f32_32_bf16", custom_kernel_mlxvid_adaln_modulate, float, 32, bfloat16_t)
INSTANTIATE("gated_f32", custom_kernel_mlxvid_gated_residual, float, float)
INSTANTIATE("gated_f32_bf16", custom_kernel_mlxvid_gated_residual, float, bfloat16_t)
INSTANTIATE("block_sparse_attention_f32_128", custom_kernel_mlxvid_block_sparse_attention, float, 128)
INSTANTIATE("block_sparse_attention_f16_128", custom_kernel_mlxvid_block_sparse_attention, half, 128)
INSTANTIATE("block_sparse_attention_bf16_128", custom_kernel_mlxvid_block_sparse_attention, bfloat16_t, 128)
