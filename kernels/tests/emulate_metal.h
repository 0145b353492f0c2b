// emulate_metal.h: the Metal built-ins and address spaces that the shared headers and the .metal bodies
// use, mapped to host C++, so both compile and run on the CPU with MLXVID_BACKEND_METAL defined -- the
// Metal branch of mlxvid_shim.h included. Order: host_types.h, this file, mlxvid_shim.h and the shared
// headers, emulate_metal_bodies.h, then the kernel wrappers that #include the .metal bodies.

#ifndef MLXVID_EMULATE_METAL_H
#define MLXVID_EMULATE_METAL_H

#define MLXVID_BACKEND_METAL 1

typedef unsigned int uint;
typedef host_bf16 bfloat16_t;
typedef host_f16 half;
typedef host_f16 float16_t;  // MLX's name for float16 in generated signatures
struct uint3 {
  uint x, y, z;
};

template <typename To, typename From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

namespace metal {
namespace precise {
inline float sqrt(float x) { return std::sqrt(x); }
inline float exp(float x) { return std::exp(x); }
}  // namespace precise
}  // namespace metal

struct mem_flags {
  enum flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
};
inline void threadgroup_barrier(mem_flags::flags) { mlxvid_group_barrier(); }

// Address spaces mean nothing on the host.
#define device
#define constant
#define thread
#define threadgroup

#endif  // MLXVID_EMULATE_METAL_H
