// host_types.h: host stand-ins for the GPU storage types and for running a threadgroup on host threads.
// Included first by the conformance test, before emulate_*.h defines the address-space macros (those
// would otherwise rewrite words like `thread` inside the standard headers).

#ifndef MLXVID_HOST_TYPES_H
#define MLXVID_HOST_TYPES_H

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// bfloat16 held as its 16 bits; float -> bf16 rounds to nearest, ties to even (NaN stays a quiet NaN),
// like Metal's bfloat, CUDA's __float2bfloat16_rn and MLX's astype.
struct host_bf16 {
  uint16_t bits = 0;
  host_bf16() = default;
  explicit host_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
      bits = uint16_t((u >> 16) | 0x0040u);
    } else {
      bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// IEEE half: GCC 12 and Clang have _Float16 on x86-64 and arm64, with round-to-nearest-even conversions.
typedef _Float16 host_f16;

// Runs `groups` threadgroups one after the other on `size` host threads, which share the kernel's static
// (threadgroup / __shared__) arrays and synchronise through mlxvid_group_barrier(). The same threads run
// every group, with a barrier between groups so that no thread starts a group before all left the last.
inline std::barrier<>*& mlxvid_current_barrier() {
  static std::barrier<>* current = nullptr;
  return current;
}
inline void mlxvid_group_barrier() { mlxvid_current_barrier()->arrive_and_wait(); }

inline void run_threadgroups(uint32_t groups, uint32_t size, const std::function<void(uint32_t, uint32_t)>& body) {
  if (groups == 0 || size == 0) return;
  std::barrier<> sync(size);
  mlxvid_current_barrier() = &sync;
  std::vector<std::thread> workers;
  workers.reserve(size);
  for (uint32_t lid = 0; lid < size; ++lid) {
    workers.emplace_back([&body, &sync, groups, lid] {
      for (uint32_t g = 0; g < groups; ++g) {
        body(g, lid);
        sync.arrive_and_wait();
      }
    });
  }
  for (auto& w : workers) w.join();
  mlxvid_current_barrier() = nullptr;
}

#endif  // MLXVID_HOST_TYPES_H
