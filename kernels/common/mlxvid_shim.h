// mlxvid_shim.h: the few macros that let the shared kernel math compile as Metal, CUDA and host C++.
//
// Exactly one backend macro is defined before this file is read:
//   MLXVID_BACKEND_METAL  Metal Shading Language (mx.fast.metal_kernel; MLX has already included
//                         <metal_stdlib>, `using namespace metal;` and bfloat16_t)
//   MLXVID_BACKEND_CUDA   CUDA through NVRTC (mx.fast.cuda_kernel; MLX has already included
//                         <cuda_bf16.h>, <cuda_fp16.h> and the fixed-width integer types)
//   MLXVID_BACKEND_HOST   plain C++17 (the conformance tests); the includer provides <cstdint> and
//                         <cmath> and, for the reductions, mlxvid_host_barrier().
// mlx_video/kernels.py prepends the right #define when it assembles a kernel's header string.
//
// What the macros cover:
//   MLXVID_FUNC            qualifiers of a helper function (inline / __device__ inline)
//   MLXVID_THREAD          the address space of a reference to a local variable (Metal `thread`)
//   MLXVID_SHARED          the address space of threadgroup / shared memory (Metal `threadgroup`)
//   MLXVID_BARRIER()       a threadgroup / block barrier over shared memory
//   mlxvid_bits_to_float   reinterpret 32 bits as a float
//   mlxvid_sqrt            correctly rounded square root (IEEE sqrt on every backend)
//   mlxvid_exp             e^x in float32 (the backend's precise exp)
//   mlxvid_to_float(v)     widen a storage value (float, half, bfloat16) to float
//   mlxvid_from_float<T>   narrow a float to a storage type, round to nearest even

#ifndef MLXVID_SHIM_H
#define MLXVID_SHIM_H

#if (defined(MLXVID_BACKEND_METAL) + defined(MLXVID_BACKEND_CUDA) + defined(MLXVID_BACKEND_HOST)) != 1
#error "define exactly one of MLXVID_BACKEND_METAL, MLXVID_BACKEND_CUDA, MLXVID_BACKEND_HOST"
#endif

#if defined(MLXVID_BACKEND_METAL)

#define MLXVID_FUNC inline
#define MLXVID_THREAD thread
#define MLXVID_SHARED threadgroup
#define MLXVID_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)

MLXVID_FUNC float mlxvid_bits_to_float(uint32_t bits) { return as_type<float>(bits); }
MLXVID_FUNC float mlxvid_sqrt(float x) { return metal::precise::sqrt(x); }
MLXVID_FUNC float mlxvid_exp(float x) { return metal::precise::exp(x); }
template <typename T>
MLXVID_FUNC float mlxvid_to_float(T v) { return static_cast<float>(v); }
template <typename T>
MLXVID_FUNC T mlxvid_from_float(float v) { return static_cast<T>(v); }

#elif defined(MLXVID_BACKEND_CUDA)

#define MLXVID_FUNC __device__ __forceinline__
#define MLXVID_THREAD
#define MLXVID_SHARED
#define MLXVID_BARRIER() __syncthreads()

MLXVID_FUNC float mlxvid_bits_to_float(uint32_t bits) { return __uint_as_float(bits); }
MLXVID_FUNC float mlxvid_sqrt(float x) { return __fsqrt_rn(x); }
MLXVID_FUNC float mlxvid_exp(float x) { return expf(x); }
MLXVID_FUNC float mlxvid_to_float(float v) { return v; }
MLXVID_FUNC float mlxvid_to_float(__half v) { return __half2float(v); }
MLXVID_FUNC float mlxvid_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
MLXVID_FUNC T mlxvid_from_float(float v);
template <>
MLXVID_FUNC float mlxvid_from_float<float>(float v) { return v; }
template <>
MLXVID_FUNC __half mlxvid_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MLXVID_FUNC __nv_bfloat16 mlxvid_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

#else  // MLXVID_BACKEND_HOST

#define MLXVID_FUNC inline
#define MLXVID_THREAD
#define MLXVID_SHARED
#define MLXVID_BARRIER() mlxvid_host_barrier()

MLXVID_FUNC float mlxvid_bits_to_float(uint32_t bits) {
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}
MLXVID_FUNC float mlxvid_sqrt(float x) { return std::sqrt(x); }
MLXVID_FUNC float mlxvid_exp(float x) { return std::exp(x); }
template <typename T>
MLXVID_FUNC float mlxvid_to_float(T v) { return static_cast<float>(v); }
template <typename T>
MLXVID_FUNC T mlxvid_from_float(float v) { return static_cast<T>(v); }

#endif

#endif  // MLXVID_SHIM_H
