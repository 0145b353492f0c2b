// kernel_wrappers.h: the kernel bodies inside host functions with the signatures MLX generates, and
// launchers with one interface for every dialect (see conformance.cpp). Define one of MLXVID_TEST_METAL,
// MLXVID_TEST_CUDA, MLXVID_TEST_HOST before including. Shared by the conformance tests and by the host
// runner library that the Python tests plug into mlx_video.kernels in place of the GPU.

#ifndef MLXVID_KERNEL_WRAPPERS_H
#define MLXVID_KERNEL_WRAPPERS_H

#include "host_types.h"

#if defined(MLXVID_TEST_METAL)
#include "emulate_metal.h"
#elif defined(MLXVID_TEST_CUDA)
#include "emulate_cuda.h"
#elif defined(MLXVID_TEST_HOST)
#define MLXVID_BACKEND_HOST 1
inline void mlxvid_host_barrier() { mlxvid_group_barrier(); }
#else
#error "define MLXVID_TEST_METAL, MLXVID_TEST_CUDA or MLXVID_TEST_HOST"
#endif

#include "../common/mlxvid_shim.h"
#include "../common/fp8.h"
#include "../common/rope.h"
#include "../common/adaln.h"
#include "../common/sparse_attention.h"

#if defined(MLXVID_TEST_METAL)
#include "emulate_metal_bodies.h"
#endif

// How MLX launches a custom kernel: `grid` threads in all (per dimension), in threadgroups / blocks of
// `group` threads (clamped to the grid, as MLX does).
struct Geometry {
  uint32_t grid[3];
  uint32_t group[3];
};

inline Geometry elementwise_geometry(uint32_t n, uint32_t grid_y = 1) {
  return Geometry{{n, grid_y, 1}, {256, 1, 1}};
}
inline Geometry row_geometry(uint32_t rows, uint32_t tg) { return Geometry{{rows * tg, 1, 1}, {tg, 1, 1}}; }
// Block-sparse attention: one thread per query row (x) and (batch, head) pair (y), as mlx_video/kernels.py.
inline Geometry sparse_geometry(uint32_t q_len, uint32_t pairs) {
  return Geometry{{q_len, pairs, 1}, {q_len < 64u ? q_len : 64u, 1, 1}};
}

#if defined(MLXVID_TEST_METAL)
static const char* const kDialect = "metal";

template <typename OutT, int FORMAT>
void kernel_fp8(const device uint8_t* codes, const device float* scale, const constant int32_t* params,
                device OutT* out, uint3 thread_position_in_grid) {
#include "../metal/fp8_dequant.metal"
}

template <typename OutT>
void kernel_rope(const device OutT* x, const device float* cos_table, const device float* sin_table,
                 const device int32_t* params, device OutT* out, uint3 thread_position_in_grid) {
#include "../metal/rope.metal"
}

template <typename OutT>
void kernel_rope_qk(const device OutT* q, const device OutT* k, const device float* cos_table,
                    const device float* sin_table, const device int32_t* params, device OutT* q_out,
                    device OutT* k_out, uint3 thread_position_in_grid) {
#include "../metal/rope_qk.metal"
}

template <typename OutT, int TG, typename XT, typename ST>
void kernel_adaln(const device XT* x, const device ST* shift, const device ST* scale, const constant int32_t* params,
                  const constant float* eps, device OutT* out, uint3 thread_position_in_threadgroup,
                  uint3 threadgroup_position_in_grid) {
#include "../metal/adaln_modulate.metal"
}

template <typename OutT, typename XT, typename GT, typename YT>
void kernel_gated(const device XT* x, const device GT* gate, const device YT* y, const constant int32_t* params,
                  device OutT* out, uint3 thread_position_in_grid) {
#include "../metal/gated_residual.metal"
}

template <typename OutT, int D>
void kernel_sparse(const device OutT* q, const device OutT* k, const device OutT* v, const device float* key_bias,
                   const device int32_t* tile_ptr, const device int32_t* tile_idx, const constant int32_t* params,
                   const constant float* scale, device OutT* out, uint3 thread_position_in_grid) {
#include "../metal/block_sparse_attention.metal"
}

// dispatchThreads: exactly grid[0] x grid[1] threads; threadgroups of `group` threads, the last ones partial.
template <typename F>
void for_each_thread(const Geometry& g, F&& f) {
  for (uint32_t y = 0; y < g.grid[1]; ++y)
    for (uint32_t x = 0; x < g.grid[0]; ++x) f(uint3{x, y, 0});
}
template <typename F>
void for_each_group(const Geometry& g, F&& f) {
  const uint32_t size = g.group[0] < g.grid[0] ? g.group[0] : g.grid[0];
  run_threadgroups((g.grid[0] + size - 1) / size, size,
                   [&](uint32_t group, uint32_t lid) { f(uint3{lid, 0, 0}, uint3{group, 0, 0}); });
}

template <typename OutT, int FORMAT>
void launch_fp8(const uint8_t* codes, const float* scale, const int32_t* params, OutT* out, const Geometry& g) {
  for_each_thread(g, [&](uint3 pos) { kernel_fp8<OutT, FORMAT>(codes, scale, params, out, pos); });
}
template <typename T>
void launch_rope(const T* x, const float* c, const float* s, const int32_t* params, T* out, const Geometry& g) {
  for_each_thread(g, [&](uint3 pos) { kernel_rope<T>(x, c, s, params, out, pos); });
}
template <typename T>
void launch_rope_qk(const T* q, const T* k, const float* c, const float* s, const int32_t* params, T* q_out,
                    T* k_out, const Geometry& g) {
  for_each_thread(g, [&](uint3 pos) { kernel_rope_qk<T>(q, k, c, s, params, q_out, k_out, pos); });
}
template <typename OutT, int TG, typename XT, typename ST>
void launch_adaln(const XT* x, const ST* shift, const ST* scale, const int32_t* params, const float* eps, OutT* out,
                  const Geometry& g) {
  for_each_group(g, [&](uint3 lid, uint3 group) {
    kernel_adaln<OutT, TG, XT, ST>(x, shift, scale, params, eps, out, lid, group);
  });
}
template <typename OutT, typename XT, typename GT, typename YT>
void launch_gated(const XT* x, const GT* gate, const YT* y, const int32_t* params, OutT* out, const Geometry& g) {
  for_each_thread(g, [&](uint3 pos) { kernel_gated<OutT, XT, GT, YT>(x, gate, y, params, out, pos); });
}
template <typename T, int D>
void launch_sparse(const T* q, const T* k, const T* v, const float* bias, const int32_t* ptr, const int32_t* idx,
                   const int32_t* params, const float* scale, T* out, const Geometry& g) {
  for_each_thread(g, [&](uint3 pos) { kernel_sparse<T, D>(q, k, v, bias, ptr, idx, params, scale, out, pos); });
}

#elif defined(MLXVID_TEST_CUDA)
static const char* const kDialect = "cuda";

template <typename OutT, int FORMAT>
__global__ void kernel_fp8(const uint8_t* codes, const float* scale, const int32_t* params, OutT* out,
                           dim3 threadIdx, dim3 blockIdx, dim3 blockDim) {
#include "../cuda/fp8_dequant.cu"
}

template <typename OutT>
__global__ void kernel_rope(const OutT* x, const float* cos_table, const float* sin_table, const int32_t* params,
                            OutT* out, dim3 threadIdx, dim3 blockIdx, dim3 blockDim) {
#include "../cuda/rope.cu"
}

template <typename OutT>
__global__ void kernel_rope_qk(const OutT* q, const OutT* k, const float* cos_table, const float* sin_table,
                               const int32_t* params, OutT* q_out, OutT* k_out, dim3 threadIdx, dim3 blockIdx,
                               dim3 blockDim) {
#include "../cuda/rope_qk.cu"
}

template <typename OutT, int TG, typename XT, typename ST>
__global__ void kernel_adaln(const XT* x, const ST* shift, const ST* scale, const int32_t* params, const float* eps,
                             OutT* out, dim3 threadIdx, dim3 blockIdx, dim3 blockDim) {
#include "../cuda/adaln_modulate.cu"
}

template <typename OutT, typename XT, typename GT, typename YT>
__global__ void kernel_gated(const XT* x, const GT* gate, const YT* y, const int32_t* params, OutT* out,
                             dim3 threadIdx, dim3 blockIdx, dim3 blockDim) {
#include "../cuda/gated_residual.cu"
}

template <typename OutT, int D>
__global__ void kernel_sparse(const OutT* q, const OutT* k, const OutT* v, const float* key_bias,
                              const int32_t* tile_ptr, const int32_t* tile_idx, const int32_t* params,
                              const float* scale, OutT* out, dim3 threadIdx, dim3 blockIdx, dim3 blockDim) {
#include "../cuda/block_sparse_attention.cu"
}

// MLX's CUDA launch: block = min(group, grid) per dimension, grid of ceil(grid / group) blocks, so the last
// block may have threads beyond the grid (the bodies check their index).
struct CudaLaunch {
  dim3 block, blocks;
  explicit CudaLaunch(const Geometry& g) {
    uint32_t b[3], n[3];
    for (int d = 0; d < 3; ++d) {
      b[d] = g.group[d] < g.grid[d] ? g.group[d] : g.grid[d];
      n[d] = (g.grid[d] + g.group[d] - 1) / g.group[d];
    }
    block = dim3{b[0], b[1], b[2]};
    blocks = dim3{n[0], n[1], n[2]};
  }
};
template <typename F>
void for_each_thread(const Geometry& g, F&& f) {
  const CudaLaunch l(g);
  for (uint32_t by = 0; by < l.blocks.y; ++by)
    for (uint32_t bx = 0; bx < l.blocks.x; ++bx)
      for (uint32_t ty = 0; ty < l.block.y; ++ty)
        for (uint32_t tx = 0; tx < l.block.x; ++tx) f(dim3{tx, ty, 0}, dim3{bx, by, 0}, l.block);
}
template <typename F>
void for_each_group(const Geometry& g, F&& f) {
  const CudaLaunch l(g);
  run_threadgroups(l.blocks.x, l.block.x,
                   [&](uint32_t group, uint32_t lid) { f(dim3{lid, 0, 0}, dim3{group, 0, 0}, l.block); });
}

template <typename OutT, int FORMAT>
void launch_fp8(const uint8_t* codes, const float* scale, const int32_t* params, OutT* out, const Geometry& g) {
  for_each_thread(g, [&](dim3 t, dim3 b, dim3 d) { kernel_fp8<OutT, FORMAT>(codes, scale, params, out, t, b, d); });
}
template <typename T>
void launch_rope(const T* x, const float* c, const float* s, const int32_t* params, T* out, const Geometry& g) {
  for_each_thread(g, [&](dim3 t, dim3 b, dim3 d) { kernel_rope<T>(x, c, s, params, out, t, b, d); });
}
template <typename T>
void launch_rope_qk(const T* q, const T* k, const float* c, const float* s, const int32_t* params, T* q_out,
                    T* k_out, const Geometry& g) {
  for_each_thread(g, [&](dim3 t, dim3 b, dim3 d) { kernel_rope_qk<T>(q, k, c, s, params, q_out, k_out, t, b, d); });
}
template <typename OutT, int TG, typename XT, typename ST>
void launch_adaln(const XT* x, const ST* shift, const ST* scale, const int32_t* params, const float* eps, OutT* out,
                  const Geometry& g) {
  for_each_group(g, [&](dim3 t, dim3 b, dim3 d) {
    kernel_adaln<OutT, TG, XT, ST>(x, shift, scale, params, eps, out, t, b, d);
  });
}
template <typename OutT, typename XT, typename GT, typename YT>
void launch_gated(const XT* x, const GT* gate, const YT* y, const int32_t* params, OutT* out, const Geometry& g) {
  for_each_thread(g, [&](dim3 t, dim3 b, dim3 d) { kernel_gated<OutT, XT, GT, YT>(x, gate, y, params, out, t, b, d); });
}
template <typename T, int D>
void launch_sparse(const T* q, const T* k, const T* v, const float* bias, const int32_t* ptr, const int32_t* idx,
                   const int32_t* params, const float* scale, T* out, const Geometry& g) {
  for_each_thread(g, [&](dim3 t, dim3 b, dim3 d) {
    kernel_sparse<T, D>(q, k, v, bias, ptr, idx, params, scale, out, t, b, d);
  });
}

#else  // MLXVID_TEST_HOST: the shared functions called from plain loops (the geometry is ignored)
static const char* const kDialect = "host";

template <typename OutT, int FORMAT>
void launch_fp8(const uint8_t* codes, const float* scale, const int32_t* params, OutT* out, const Geometry&) {
  const uint32_t n = uint32_t(params[0]), cols = uint32_t(params[1]);
  for (uint32_t i = 0; i < n; ++i)
    out[i] = mlxvid_from_float<OutT>(mlxvid_fp8_dequant_value(codes[i], FORMAT, scale[i / cols]));
}
template <typename T>
void launch_rope(const T* x, const float* c, const float* s, const int32_t* p, T* out, const Geometry&) {
  const uint32_t pairs = uint32_t(p[0]);
  for (uint32_t i = 0; i < pairs; ++i) {
    const uint32_t pair = i % uint32_t(p[3]);
    const uint32_t token = (i / (uint32_t(p[3]) * uint32_t(p[2]))) % uint32_t(p[1]);
    const uint32_t t = mlxvid_rope_table_index(token, pair, p[4], p[5], p[6], p[7], p[8], p[9]);
    float y0, y1;
    mlxvid_rope_pair(mlxvid_to_float(x[2 * i]), mlxvid_to_float(x[2 * i + 1]), c[t], s[t], y0, y1);
    out[2 * i] = mlxvid_from_float<T>(y0);
    out[2 * i + 1] = mlxvid_from_float<T>(y1);
  }
}
template <typename T>
void launch_rope_qk(const T* q, const T* k, const float* c, const float* s, const int32_t* params, T* q_out,
                    T* k_out, const Geometry& g) {
  launch_rope(q, c, s, params, q_out, g);
  launch_rope(k, c, s, params, k_out, g);
}
// The threadgroup structure of the GPU kernels, written once more in plain host C++: TG host threads per
// row, a shared scratch array, mlxvid_group_sum synchronising through MLXVID_BARRIER (mlxvid_host_barrier).
template <typename OutT, int TG, typename XT, typename ST>
void launch_adaln(const XT* x, const ST* shift, const ST* scale, const int32_t* params, const float* eps, OutT* out,
                  const Geometry& g) {
  static float scratch[TG];
  const uint32_t dim = uint32_t(params[0]), rep = uint32_t(params[1]);
  run_threadgroups(g.grid[0] / TG, TG, [&](uint32_t row, uint32_t lid) {
    const XT* xr = x + size_t(row) * dim;
    const size_t m = size_t(row / rep) * dim;
    float acc = 0.0f;
    for (uint32_t j = lid; j < dim; j += TG) acc += mlxvid_to_float(xr[j]);
    const float mean = mlxvid_group_sum(scratch, acc, lid, TG) / float(dim);
    acc = 0.0f;
    for (uint32_t j = lid; j < dim; j += TG) {
      const float d = mlxvid_to_float(xr[j]) - mean;
      acc += d * d;
    }
    const float inv_std = mlxvid_inv_std(mlxvid_group_sum(scratch, acc, lid, TG) / float(dim), eps[0]);
    for (uint32_t j = lid; j < dim; j += TG) {
      const float xhat = mlxvid_normalize(mlxvid_to_float(xr[j]), mean, inv_std);
      out[size_t(row) * dim + j] = mlxvid_from_float<OutT>(
          mlxvid_modulate(xhat, mlxvid_to_float(shift[m + j]), mlxvid_to_float(scale[m + j])));
    }
  });
}
template <typename OutT, typename XT, typename GT, typename YT>
void launch_gated(const XT* x, const GT* gate, const YT* y, const int32_t* params, OutT* out, const Geometry&) {
  const uint32_t n = uint32_t(params[0]), dim = uint32_t(params[1]), rep = uint32_t(params[2]);
  for (uint32_t i = 0; i < n; ++i)
    out[i] = mlxvid_from_float<OutT>(mlxvid_gated_residual_value(
        mlxvid_to_float(x[i]), mlxvid_to_float(gate[(i / dim / rep) * dim + i % dim]), mlxvid_to_float(y[i])));
}
// The shared online-softmax functions from plain loops over rows, (batch, head) pairs and kept keys.
template <typename T, int D>
void launch_sparse(const T* q, const T* k, const T* v, const float* bias, const int32_t* ptr, const int32_t* idx,
                   const int32_t* params, const float* scale, T* out, const Geometry& g) {
  const uint32_t q_len = uint32_t(params[0]), k_len = uint32_t(params[1]), tile = uint32_t(params[2]);
  const uint32_t heads = uint32_t(params[3]);
  for (uint32_t bh = 0; bh < g.grid[1]; ++bh) {
    for (uint32_t row = 0; row < q_len; ++row) {
      const T* qr = q + (size_t(bh) * q_len + row) * D;
      float acc[D] = {};
      float m = mlxvid_negative_infinity(), l = 0.0f;
      for (int32_t t = ptr[row / tile]; t < ptr[row / tile + 1]; ++t) {
        for (uint32_t j = uint32_t(idx[t]) * tile; j < std::min(uint32_t(idx[t]) * tile + tile, k_len); ++j) {
          const size_t kv = (size_t(bh) * k_len + j) * D;
          float s = 0.0f;
          for (int d = 0; d < D; ++d) s += mlxvid_to_float(qr[d]) * scale[0] * mlxvid_to_float(k[kv + d]);
          float rescale;
          const float p = mlxvid_softmax_fold(s + bias[(bh / heads) * k_len + j], m, l, rescale);
          for (int d = 0; d < D; ++d) acc[d] = acc[d] * rescale + p * mlxvid_to_float(v[kv + d]);
        }
      }
      for (int d = 0; d < D; ++d)
        out[(size_t(bh) * q_len + row) * D + d] = mlxvid_from_float<T>(mlxvid_softmax_finish(acc[d], l));
    }
  }
}
#endif

#endif  // MLXVID_KERNEL_WRAPPERS_H
