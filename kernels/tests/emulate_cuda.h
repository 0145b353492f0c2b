// emulate_cuda.h: the CUDA built-ins and intrinsics that the shared headers and the .cu bodies use, mapped
// to host C++, so both compile and run on the CPU with MLXVID_BACKEND_CUDA defined -- the CUDA branch of
// mlxvid_shim.h included. Order: host_types.h, this file, mlxvid_shim.h and the shared headers, then the
// kernel wrappers that #include the .cu bodies. threadIdx, blockIdx and blockDim are parameters of those
// wrappers.

#ifndef MLXVID_EMULATE_CUDA_H
#define MLXVID_EMULATE_CUDA_H

#define MLXVID_BACKEND_CUDA 1

typedef host_bf16 __nv_bfloat16;
typedef host_f16 __half;
struct dim3 {
  uint32_t x, y, z;
};

#define __device__
#define __forceinline__ inline
#define __global__
// One __shared__ array per block: a function-local static shared by the host threads running the block.
#define __shared__ static

inline float __uint_as_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return static_cast<__half>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline void __syncthreads() { mlxvid_group_barrier(); }

#endif  // MLXVID_EMULATE_CUDA_H
