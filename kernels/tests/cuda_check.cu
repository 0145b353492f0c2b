// cuda_check.cu: a build check of the CUDA kernel sources with nvcc (CMakeLists.txt compiles it to a cubin
// when nvcc is found; nothing runs it). It reproduces what mx.fast.cuda_kernel compiles: MLX's prelude
// (cuda_bf16.h, cuda_fp16.h, cooperative_groups), the header string that mlx_video/kernels.py assembles
// (backend define, shim, shared headers), then each body inside a __global__ function in namespace
// mlx::core::cu named custom_kernel_<name>. MLX declares the template arguments inside the function
// (`using OutT = ...;`, `constexpr int TG = ...;`); here they are template parameters so that one file covers
// every variant. tests/test_kernels.py also compiles the exact MLX form of each variant the dispatch layer uses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cstdint>

#define MLXVID_BACKEND_CUDA 1
#include "../common/mlxvid_shim.h"
#include "../common/fp8.h"
#include "../common/rope.h"
#include "../common/adaln.h"
#include "../common/sparse_attention.h"

namespace mlx::core::cu {

template <typename OutT, int FORMAT>
__global__ void custom_kernel_mlxvid_fp8_dequant(const uint8_t* codes, const float* scale, const int32_t* params,
                                                 OutT* out) {
#include "../cuda/fp8_dequant.cu"
}

template <typename OutT>
__global__ void custom_kernel_mlxvid_rope(const OutT* x, const float* cos_table, const float* sin_table,
                                          const int32_t* params, OutT* out) {
#include "../cuda/rope.cu"
}

template <typename OutT>
__global__ void custom_kernel_mlxvid_rope_qk(const OutT* q, const OutT* k, const float* cos_table,
                                             const float* sin_table, const int32_t* params, OutT* q_out,
                                             OutT* k_out) {
#include "../cuda/rope_qk.cu"
}

template <typename OutT, int TG, typename XT>
__global__ void custom_kernel_mlxvid_adaln_modulate(const XT* x, const float* shift, const float* scale,
                                                    const int32_t* params, const float* eps, OutT* out) {
#include "../cuda/adaln_modulate.cu"
}

template <typename OutT, typename YT>
__global__ void custom_kernel_mlxvid_gated_residual(const float* x, const float* gate, const YT* y,
                                                    const int32_t* params, OutT* out) {
#include "../cuda/gated_residual.cu"
}

template <typename OutT, int D>
__global__ void custom_kernel_mlxvid_block_sparse_attention(const OutT* q, const OutT* k, const OutT* v,
                                                            const float* key_bias, const int32_t* tile_ptr,
                                                            const int32_t* tile_idx, const int32_t* params,
                                                            const float* scale, OutT* out) {
#include "../cuda/block_sparse_attention.cu"
}

// Taking their addresses instantiates the variants the dispatch layer uses.
extern void* const instances[] = {
    (void*)custom_kernel_mlxvid_fp8_dequant<float, 0>,
    (void*)custom_kernel_mlxvid_fp8_dequant<__half, 0>,
    (void*)custom_kernel_mlxvid_fp8_dequant<__nv_bfloat16, 0>,
    (void*)custom_kernel_mlxvid_fp8_dequant<float, 1>,
    (void*)custom_kernel_mlxvid_fp8_dequant<__half, 1>,
    (void*)custom_kernel_mlxvid_fp8_dequant<__nv_bfloat16, 1>,
    (void*)custom_kernel_mlxvid_rope<float>,
    (void*)custom_kernel_mlxvid_rope<__half>,
    (void*)custom_kernel_mlxvid_rope<__nv_bfloat16>,
    (void*)custom_kernel_mlxvid_rope_qk<float>,
    (void*)custom_kernel_mlxvid_rope_qk<__half>,
    (void*)custom_kernel_mlxvid_rope_qk<__nv_bfloat16>,
    (void*)custom_kernel_mlxvid_adaln_modulate<float, 256, float>,
    (void*)custom_kernel_mlxvid_adaln_modulate<float, 32, __nv_bfloat16>,
    (void*)custom_kernel_mlxvid_gated_residual<float, float>,
    (void*)custom_kernel_mlxvid_gated_residual<float, __nv_bfloat16>,
    (void*)custom_kernel_mlxvid_block_sparse_attention<float, 128>,
    (void*)custom_kernel_mlxvid_block_sparse_attention<__half, 128>,
    (void*)custom_kernel_mlxvid_block_sparse_attention<__nv_bfloat16, 128>,
};

}  // namespace mlx::core::cu
