// host_runner.h: an exported C entry point that runs the kernel bodies on the host, launched the way MLX
// launches them (grid, threadgroup, template arguments, inputs and outputs in the order of the Python spec).
//
// Part of conformance.cpp, whose object CMakeLists.txt links both into the conformance_<dialect> test and
// into the shared library libmlxvid_host_kernels_<dialect>.
//
// The Python tests (tests/test_kernels.py) load it with ctypes and put it in place of mx.fast.metal_kernel /
// cuda_kernel, so mlx_video.kernels runs its GPU code path end to end -- argument marshalling, parameter
// layouts, grid sizes, the .metal / .cu bodies and the shared headers -- on a machine without a GPU.
//
//   int mlxvid_host_launch(name, inputs, input_dtypes, n_inputs, outputs, output_dtypes, n_outputs,
//                          template_ints, n_template, grid[3], group[3])
// dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 uint8, 4 int32. template_ints are the template arguments
// in spec order, a dtype argument given by its code. Returns 0, or a non-zero code for an unsupported
// combination (nothing is written then).

#include "kernel_wrappers.h"

#ifndef MLXVID_HOST_RUNNER_H
#define MLXVID_HOST_RUNNER_H

namespace {

enum DtypeCode { kF32 = 0, kF16 = 1, kBF16 = 2, kU8 = 3, kI32 = 4 };

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>) for the float type with dtype code `code`; false if it is not a float code.
template <typename F>
bool with_float(int code, F&& f) {
  switch (code) {
    case kF32: f(Tag<float>{}); return true;
    case kF16: f(Tag<host_f16>{}); return true;
    case kBF16: f(Tag<host_bf16>{}); return true;
    default: return false;
  }
}
template <typename F>
bool with_f32_or_bf16(int code, F&& f) {
  switch (code) {
    case kF32: f(Tag<float>{}); return true;
    case kBF16: f(Tag<host_bf16>{}); return true;
    default: return false;
  }
}
template <typename F>
bool with_group(int tg, F&& f) {
  switch (tg) {
    case 32: f(std::integral_constant<int, 32>{}); return true;
    case 64: f(std::integral_constant<int, 64>{}); return true;
    case 128: f(std::integral_constant<int, 128>{}); return true;
    case 256: f(std::integral_constant<int, 256>{}); return true;
    default: return false;
  }
}

// Calls f(std::integral_constant<int, D>) for a head width the host runner is built for; false otherwise.
template <typename F>
bool with_head_dim(int d, F&& f) {
  switch (d) {
#define MLXVID_HEAD_DIM(n) \
  case n: f(std::integral_constant<int, n>{}); return true;
    MLXVID_HEAD_DIM(12) MLXVID_HEAD_DIM(16) MLXVID_HEAD_DIM(20) MLXVID_HEAD_DIM(24) MLXVID_HEAD_DIM(32)
    MLXVID_HEAD_DIM(40) MLXVID_HEAD_DIM(48) MLXVID_HEAD_DIM(64) MLXVID_HEAD_DIM(72) MLXVID_HEAD_DIM(80)
    MLXVID_HEAD_DIM(96) MLXVID_HEAD_DIM(128)
#undef MLXVID_HEAD_DIM
    default: return false;
  }
}

}  // namespace

extern "C" int mlxvid_host_launch(const char* name_c, const void* const* in, const int* in_dtypes, int n_in,
                                  void* const* out, const int* out_dtypes, int n_out, const int* tmpl, int n_tmpl,
                                  const uint32_t* grid, const uint32_t* group) {
  const std::string name(name_c);
  const Geometry g{{grid[0], grid[1], grid[2]}, {group[0], group[1], group[2]}};
  auto i32 = [&](int k) { return static_cast<const int32_t*>(in[k]); };
  auto f32 = [&](int k) { return static_cast<const float*>(in[k]); };

  if (name == "mlxvid_fp8_dequant") {
    if (n_in != 3 || n_out != 1 || n_tmpl != 2 || in_dtypes[0] != kU8 || in_dtypes[1] != kF32 ||
        tmpl[0] != out_dtypes[0])
      return 2;
    const auto* codes = static_cast<const uint8_t*>(in[0]);
    const int format = tmpl[1];
    const bool ok = with_float(tmpl[0], [&](auto tag) {
      using OutT = typename decltype(tag)::type;
      auto* o = static_cast<OutT*>(out[0]);
      if (format == MLXVID_FP8_E4M3FN) launch_fp8<OutT, MLXVID_FP8_E4M3FN>(codes, f32(1), i32(2), o, g);
      else launch_fp8<OutT, MLXVID_FP8_E5M2>(codes, f32(1), i32(2), o, g);
    });
    return ok && (format == 0 || format == 1) ? 0 : 3;
  }

  if (name == "mlxvid_rope" || name == "mlxvid_rope_qk") {
    const bool qk = name == "mlxvid_rope_qk";
    const int first_table = qk ? 2 : 1;
    if (n_in != first_table + 3 || n_out != (qk ? 2 : 1) || n_tmpl != 1 || in_dtypes[0] != tmpl[0] ||
        out_dtypes[0] != tmpl[0] || in_dtypes[first_table] != kF32 || in_dtypes[first_table + 1] != kF32)
      return 2;
    const bool ok = with_float(tmpl[0], [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (qk)
        launch_rope_qk<T>(static_cast<const T*>(in[0]), static_cast<const T*>(in[1]), f32(2), f32(3), i32(4),
                          static_cast<T*>(out[0]), static_cast<T*>(out[1]), g);
      else
        launch_rope<T>(static_cast<const T*>(in[0]), f32(1), f32(2), i32(3), static_cast<T*>(out[0]), g);
    });
    return ok ? 0 : 3;
  }

  if (name == "mlxvid_adaln_modulate") {
    if (n_in != 5 || n_out != 1 || n_tmpl != 2 || tmpl[0] != kF32 || out_dtypes[0] != kF32 ||
        in_dtypes[1] != in_dtypes[2] || in_dtypes[4] != kF32)
      return 2;
    bool ok = false;
    with_f32_or_bf16(in_dtypes[0], [&](auto xtag) {
      with_f32_or_bf16(in_dtypes[1], [&](auto stag) {
        ok = with_group(tmpl[1], [&](auto tg) {
          using XT = typename decltype(xtag)::type;
          using ST = typename decltype(stag)::type;
          launch_adaln<float, decltype(tg)::value, XT, ST>(
              static_cast<const XT*>(in[0]), static_cast<const ST*>(in[1]), static_cast<const ST*>(in[2]), i32(3),
              f32(4), static_cast<float*>(out[0]), g);
        });
      });
    });
    return ok ? 0 : 3;
  }

  if (name == "mlxvid_gated_residual") {
    if (n_in != 4 || n_out != 1 || n_tmpl != 1 || tmpl[0] != out_dtypes[0]) return 2;
    bool ok = false;
    with_f32_or_bf16(tmpl[0], [&](auto otag) {
      with_f32_or_bf16(in_dtypes[0], [&](auto xtag) {
        with_f32_or_bf16(in_dtypes[1], [&](auto gtag) {
          ok = with_f32_or_bf16(in_dtypes[2], [&](auto ytag) {
            using OutT = typename decltype(otag)::type;
            using XT = typename decltype(xtag)::type;
            using GT = typename decltype(gtag)::type;
            using YT = typename decltype(ytag)::type;
            launch_gated<OutT, XT, GT, YT>(static_cast<const XT*>(in[0]), static_cast<const GT*>(in[1]),
                                           static_cast<const YT*>(in[2]), i32(3), static_cast<OutT*>(out[0]), g);
          });
        });
      });
    });
    return ok ? 0 : 3;
  }
  if (name == "mlxvid_block_sparse_attention") {
    if (n_in != 8 || n_out != 1 || n_tmpl != 2 || in_dtypes[0] != tmpl[0] || in_dtypes[1] != tmpl[0] ||
        in_dtypes[2] != tmpl[0] || out_dtypes[0] != tmpl[0] || in_dtypes[3] != kF32 || in_dtypes[4] != kI32 ||
        in_dtypes[5] != kI32 || in_dtypes[6] != kI32 || in_dtypes[7] != kF32)
      return 2;
    bool ok = false;
    with_float(tmpl[0], [&](auto tag) {
      ok = with_head_dim(tmpl[1], [&](auto dim) {
        using T = typename decltype(tag)::type;
        launch_sparse<T, decltype(dim)::value>(static_cast<const T*>(in[0]), static_cast<const T*>(in[1]),
                                               static_cast<const T*>(in[2]), f32(3), i32(4), i32(5), i32(6), f32(7),
                                               static_cast<T*>(out[0]), g);
      });
    });
    return ok ? 0 : 3;
  }
  return 1;
}

extern "C" const char* mlxvid_host_dialect() { return kDialect; }

#endif  // MLXVID_HOST_RUNNER_H
