// Host conformance tests of the kernel sources (built by the top-level CMakeLists.txt, run by ctest).
//
// Compiled once per dialect:
//   MLXVID_TEST_METAL  the shared headers through the Metal branch of mlxvid_shim.h, and the .metal bodies
//                      pasted into host functions with the signatures mx.fast.metal_kernel generates;
//                      Metal built-ins emulated by emulate_metal.h; threadgroups run as host threads.
//   MLXVID_TEST_CUDA   the same for the CUDA branch and the .cu bodies (emulate_cuda.h).
//   MLXVID_TEST_HOST   the shared headers as plain host C++ (MLXVID_BACKEND_HOST), called from CPU loops.
// Every dialect runs the same checks against references computed here independently, in double precision
// or (fp8) from the bit fields with std::ldexp:
//   fp8     all 256 codes of e4m3fn and e5m2, bit for bit (NaN must be the canonical 0x7FC00000); per-tensor
//           and per-output-channel scales; float32, bfloat16 and float16 outputs
//   rope    the 3-axis (Wan 22/21/21, tiny Wan 4/3/3, HunyuanVideo 8/28/28) and 1-axis table forms, one
//           tensor and q+k in one launch, float32 and bfloat16, against a rotation by the angle itself
//   adaln   LayerNorm (no affine) + x*(1+scale)+shift against a double loop, several dims and group sizes
//   gated   x + y*gate against a double loop
//   sparse  block-sparse attention (online softmax over the kept key tiles, additive and -inf key biases)
//           against a double-precision softmax over the same keys
// `conformance_<dialect> fp8-dump` prints the float32 bits of the 512 decoded codes, which the Python tests
// compare with the portable path's lookup tables. The kernels are launched with the geometry mlx_video.kernels
// uses (kernel_wrappers.h); the same object also exports mlxvid_host_launch (host_runner.h) for the Python tests.

#include "kernel_wrappers.h"
#include "host_runner.h"

// ---------------------------------------------------------------------------------------------------------
// References and checks
// ---------------------------------------------------------------------------------------------------------

static int g_failures = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      if (++g_failures <= 20) {                                   \
        std::fprintf(stderr, "[%s] FAIL %s:%d: ", kDialect, __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                        \
        std::fprintf(stderr, "\n");                               \
      }                                                           \
    }                                                             \
  } while (0)

static uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The value of an fp8 code from its fields, with std::ldexp (independent of common/fp8.h).
static double fp8_reference(uint32_t code, int exp_bits, int man_bits, bool finite_only) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const uint32_t e = (code >> man_bits) & ((1u << exp_bits) - 1);
  const uint32_t m = code & ((1u << man_bits) - 1);
  const double sign = (code & 0x80u) ? -1.0 : 1.0;
  const bool top = e == (1u << exp_bits) - 1;
  if (finite_only) {
    if (top && m == (1u << man_bits) - 1) return std::nan("");
  } else if (top) {
    return m == 0 ? sign * INFINITY : std::nan("");
  }
  if (e == 0) return sign * std::ldexp(double(m), 1 - bias - man_bits);
  return sign * std::ldexp(double((1u << man_bits) + m), int(e) - bias - man_bits);
}

// Round a double to a float format with `sig` significant bits and smallest normal exponent `emin`
// (value 2^emin) and largest finite `max_finite`: nearest, ties to even; beyond the range, infinity.
static double round_to_format(double x, int sig, int emin, double max_finite) {
  if (std::isnan(x) || std::isinf(x) || x == 0.0) return x;
  int e;
  std::frexp(x, &e);  // |x| = f * 2^e, f in [0.5, 1)
  int q = e - sig;    // quantum exponent
  if (q < emin - sig + 1) q = emin - sig + 1;  // subnormals share the smallest normal's quantum
  const double r = std::nearbyint(std::ldexp(x, -q));  // default rounding mode: ties to even
  const double y = std::ldexp(r, q);
  if (std::fabs(y) > max_finite) return std::copysign(INFINITY, x);
  return y;
}
static double round_bf16(double x) { return round_to_format(x, 8, -126, 3.3895313892515355e38); }
static double round_f16(double x) { return round_to_format(x, 11, -14, 65504.0); }

template <int FORMAT>
static void fp8_decode_all(float* out) {
  std::vector<uint8_t> codes(256);
  for (int c = 0; c < 256; ++c) codes[c] = uint8_t(c);
  const float one = 1.0f;
  const int32_t params[2] = {256, 256};
  launch_fp8<float, FORMAT>(codes.data(), &one, params, out, elementwise_geometry(256));
}

template <int FORMAT, typename OutT>
static void check_fp8_scaled(int exp_bits, int man_bits, bool finite_only, double (*round)(double),
                             const char* what) {
  // 8 output channels, each holding all 256 codes (in a shuffled order), one scale each, then one scale for
  // the whole tensor.
  const uint32_t rows = 8, cols = 256, n = rows * cols;
  std::mt19937 rng(1234 + FORMAT);
  std::vector<uint8_t> codes(n);
  for (uint32_t r = 0; r < rows; ++r)
    for (uint32_t c = 0; c < cols; ++c) codes[r * cols + c] = uint8_t((c * 37 + r * 11) & 0xFF);
  std::uniform_real_distribution<float> mag(0.25f, 4.0f);
  std::vector<float> scales(rows);
  for (uint32_t r = 0; r < rows; ++r) scales[r] = (r % 3 == 2 ? -1.0f : 1.0f) * mag(rng);
  std::vector<OutT> out(n);
  for (int per_channel = 0; per_channel < 2; ++per_channel) {
    const int32_t params[2] = {int32_t(n), int32_t(per_channel ? cols : n)};
    launch_fp8<OutT, FORMAT>(codes.data(), scales.data(), params, out.data(), elementwise_geometry(n));
    int bad = 0;
    for (uint32_t i = 0; i < n; ++i) {
      const float s = scales[per_channel ? i / cols : 0];
      const double v = fp8_reference(codes[i], exp_bits, man_bits, finite_only);
      // decode * scale in float32 is the exact product rounded once; then the output format's rounding.
      const double expected = round(double(float(v * double(s))));
      const float got = static_cast<float>(out[i]);
      const bool ok = std::isnan(expected) ? std::isnan(got)
                                           : (double(got) == expected && std::signbit(got) == std::signbit(expected));
      if (!ok && bad++ < 5)
        CHECK(false, "fp8 %s %s code 0x%02x scale %g: got %.9g expected %.9g", what,
              per_channel ? "per-channel" : "per-tensor", codes[i], s, double(got), expected);
    }
    CHECK(bad == 0, "fp8 %s: %d mismatches", what, bad);
  }
}

static double identity(double x) { return x; }
static double round_f32(double x) { return double(float(x)); }

static void test_fp8() {
  for (int format = 0; format < 2; ++format) {
    const int exp_bits = format == 0 ? 4 : 5, man_bits = format == 0 ? 3 : 2;
    const bool finite_only = format == 0;
    float out[256];
    if (format == 0) fp8_decode_all<MLXVID_FP8_E4M3FN>(out);
    else fp8_decode_all<MLXVID_FP8_E5M2>(out);
    int nans = 0;
    for (uint32_t c = 0; c < 256; ++c) {
      const double ref = fp8_reference(c, exp_bits, man_bits, finite_only);
      if (std::isnan(ref)) {
        ++nans;
        CHECK(float_bits(out[c]) == MLXVID_CANONICAL_NAN_BITS, "fp8 format %d code 0x%02x: NaN bits 0x%08x", format,
              c, float_bits(out[c]));
      } else {
        CHECK(float_bits(out[c]) == float_bits(float(ref)) && double(float(ref)) == ref,
              "fp8 format %d code 0x%02x: got %.9g (0x%08x), expected %.9g", format, c, double(out[c]),
              float_bits(out[c]), ref);
      }
    }
    CHECK(nans == (format == 0 ? 2 : 6), "fp8 format %d: %d NaN codes", format, nans);
  }
  // Spot values from the format definitions.
  CHECK(mlxvid_fp8_e4m3fn_to_float(0x7E) == 448.0f, "e4m3fn max");
  CHECK(mlxvid_fp8_e4m3fn_to_float(0x01) == 0.001953125f, "e4m3fn smallest subnormal");
  CHECK(mlxvid_fp8_e5m2_to_float(0x7B) == 57344.0f, "e5m2 max");
  CHECK(std::isinf(mlxvid_fp8_e5m2_to_float(0xFC)) && mlxvid_fp8_e5m2_to_float(0xFC) < 0, "e5m2 -inf");
  CHECK(std::signbit(mlxvid_fp8_e4m3fn_to_float(0x80)) && mlxvid_fp8_e4m3fn_to_float(0x80) == 0.0f, "-0");

  (void)identity;
  check_fp8_scaled<MLXVID_FP8_E4M3FN, float>(4, 3, true, round_f32, "e4m3fn->f32");
  check_fp8_scaled<MLXVID_FP8_E5M2, float>(5, 2, false, round_f32, "e5m2->f32");
  check_fp8_scaled<MLXVID_FP8_E4M3FN, host_bf16>(4, 3, true, round_bf16, "e4m3fn->bf16");
  check_fp8_scaled<MLXVID_FP8_E5M2, host_bf16>(5, 2, false, round_bf16, "e5m2->bf16");
  check_fp8_scaled<MLXVID_FP8_E4M3FN, host_f16>(4, 3, true, round_f16, "e4m3fn->f16");
  check_fp8_scaled<MLXVID_FP8_E5M2, host_f16>(5, 2, false, round_f16, "e5m2->f16");
}

static void dump_fp8() {
  float out[256];
  fp8_decode_all<MLXVID_FP8_E4M3FN>(out);
  for (int c = 0; c < 256; ++c) std::printf("e4m3fn %d %08x\n", c, float_bits(out[c]));
  fp8_decode_all<MLXVID_FP8_E5M2>(out);
  for (int c = 0; c < 256; ++c) std::printf("e5m2 %d %08x\n", c, float_bits(out[c]));
}

// ---- rope ----

struct RopeCase {
  const char* name;
  uint32_t batch, heads;
  uint32_t sizes[3];  // grid
  uint32_t pairs[3];  // pairs per axis
  double theta;
  bool one_axis;      // pass the full (L, D/2) table as a 1-axis table
};

// The angle of pair `pair` of the token at grid coordinates `coord`, straight from the definition.
static double rope_angle(const RopeCase& rc, const uint32_t coord[3], uint32_t pair) {
  uint32_t axis = 0, first = 0;
  while (pair >= first + rc.pairs[axis]) first += rc.pairs[axis++];
  const double dims = 2.0 * rc.pairs[axis];
  const double inv_freq = std::pow(rc.theta, -2.0 * (pair - first) / dims);
  return coord[axis] * inv_freq;
}

template <typename T>
static void check_rope(const RopeCase& rc, double tol, const char* what) {
  const uint32_t tokens = rc.sizes[0] * rc.sizes[1] * rc.sizes[2];
  const uint32_t half = rc.pairs[0] + rc.pairs[1] + rc.pairs[2];
  const uint32_t n_pairs = rc.batch * tokens * rc.heads * half;
  // Tables as the host builds them: float32 cos/sin of float64 angles.
  std::vector<float> ctab, stab;
  int32_t params[10] = {int32_t(n_pairs), int32_t(tokens), int32_t(rc.heads), int32_t(half), 0, 0, 0, 0, 0, 0};
  if (rc.one_axis) {
    for (uint32_t l = 0; l < tokens; ++l) {
      const uint32_t coord[3] = {l / (rc.sizes[1] * rc.sizes[2]), (l / rc.sizes[2]) % rc.sizes[1], l % rc.sizes[2]};
      for (uint32_t p = 0; p < half; ++p) {
        ctab.push_back(float(std::cos(rope_angle(rc, coord, p))));
        stab.push_back(float(std::sin(rope_angle(rc, coord, p))));
      }
    }
    const int32_t axes[6] = {int32_t(tokens), 1, 1, int32_t(half), 0, 0};
    std::memcpy(params + 4, axes, sizeof axes);
  } else {
    uint32_t first = 0;
    for (int a = 0; a < 3; ++a) {
      for (uint32_t pos = 0; pos < rc.sizes[a]; ++pos)
        for (uint32_t j = 0; j < rc.pairs[a]; ++j) {
          uint32_t coord[3] = {0, 0, 0};
          coord[a] = pos;
          ctab.push_back(float(std::cos(rope_angle(rc, coord, first + j))));
          stab.push_back(float(std::sin(rope_angle(rc, coord, first + j))));
        }
      first += rc.pairs[a];
      params[4 + a] = int32_t(rc.sizes[a]);
      params[7 + a] = int32_t(rc.pairs[a]);
    }
  }
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = size_t(n_pairs) * 2;
  std::vector<T> q(n), k(n), out(n), q_out(n), k_out(n);
  for (size_t i = 0; i < n; ++i) {
    q[i] = T(normal(rng));
    k[i] = T(normal(rng));
  }
  launch_rope<T>(q.data(), ctab.data(), stab.data(), params, out.data(), elementwise_geometry(n_pairs));
  launch_rope_qk<T>(q.data(), k.data(), ctab.data(), stab.data(), params, q_out.data(), k_out.data(),
                    elementwise_geometry(n_pairs, 2));

  double err2 = 0.0, ref2 = 0.0, worst = 0.0;
  int bad = 0;
  for (int which = 0; which < 3; ++which) {
    const std::vector<T>& src = which == 1 ? k : q;
    const std::vector<T>& got = which == 0 ? out : (which == 1 ? k_out : q_out);
    for (uint32_t i = 0; i < n_pairs; ++i) {
      const uint32_t pair = i % half;
      const uint32_t l = (i / (half * rc.heads)) % tokens;
      const uint32_t coord[3] = {l / (rc.sizes[1] * rc.sizes[2]), (l / rc.sizes[2]) % rc.sizes[1], l % rc.sizes[2]};
      const double angle = rope_angle(rc, coord, pair);
      const double x0 = static_cast<float>(src[2 * i]), x1 = static_cast<float>(src[2 * i + 1]);
      const double r0 = x0 * std::cos(angle) - x1 * std::sin(angle);
      const double r1 = x0 * std::sin(angle) + x1 * std::cos(angle);
      const double g0 = static_cast<float>(got[2 * i]), g1 = static_cast<float>(got[2 * i + 1]);
      const double e = std::hypot(g0 - r0, g1 - r1), m = std::hypot(x0, x1);
      err2 += e * e;
      ref2 += r0 * r0 + r1 * r1;
      worst = std::max(worst, e / (m + 1e-30));
      if (e > tol * m && bad++ < 5)
        CHECK(false, "rope %s %s pair %u: got (%.9g, %.9g) expected (%.9g, %.9g)", rc.name, what, i, g0, g1, r0, r1);
    }
  }
  const double rel = std::sqrt(err2 / ref2);
  CHECK(bad == 0, "rope %s %s: %d pairs beyond %g relative", rc.name, what, bad, tol);
  std::printf("[%s] rope %-28s %-5s relative error %.2e (worst pair %.2e)\n", kDialect, rc.name, what, rel, worst);
}

static void test_rope() {
  const RopeCase cases[] = {
      {"tiny-wan 4/3/3 (3,4,5)", 2, 3, {3, 4, 5}, {4, 3, 3}, 10000.0, false},
      {"wan 22/21/21 (2,3,4)", 1, 2, {2, 3, 4}, {22, 21, 21}, 10000.0, false},
      {"hunyuan 8/28/28 (2,2,3)", 1, 2, {2, 2, 3}, {8, 28, 28}, 256.0, false},
      {"full table 1-axis (3,4,5)", 2, 2, {3, 4, 5}, {4, 3, 3}, 10000.0, true},
  };
  for (const auto& rc : cases) {
    // float32: the pair error is a few float32 ulps of the pair's magnitude (table rounding included).
    check_rope<float>(rc, 1e-6, "f32");
    // bfloat16 in and out: one rounding to 8 significant bits on top.
    check_rope<host_bf16>(rc, 1.0 / 128, "bf16");
  }
}

// ---- adaLN and the gated residual ----

template <int TG, typename InT>
static void check_adaln(uint32_t rows, uint32_t dim, uint32_t rep, const char* what) {
  std::mt19937 rng(7 + dim + TG);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<InT> x(size_t(rows) * dim), shift(size_t(rows / rep) * dim), scale(size_t(rows / rep) * dim);
  for (auto& v : x) v = InT(3.0f + 2.0f * normal(rng));  // off-centre, to exercise the mean
  for (auto& v : shift) v = InT(0.5f * normal(rng));
  for (auto& v : scale) v = InT(0.5f * normal(rng));
  const float eps = 1e-6f;
  const int32_t params[2] = {int32_t(dim), int32_t(rep)};
  std::vector<float> out(x.size());
  launch_adaln<float, TG, InT, InT>(x.data(), shift.data(), scale.data(), params, &eps, out.data(),
                                    row_geometry(rows, TG));
  double err2 = 0.0, ref2 = 0.0, worst = 0.0;
  for (uint32_t r = 0; r < rows; ++r) {
    double mean = 0.0, var = 0.0;
    for (uint32_t j = 0; j < dim; ++j) mean += static_cast<float>(x[size_t(r) * dim + j]);
    mean /= dim;
    for (uint32_t j = 0; j < dim; ++j) {
      const double d = static_cast<float>(x[size_t(r) * dim + j]) - mean;
      var += d * d;
    }
    var /= dim;
    for (uint32_t j = 0; j < dim; ++j) {
      const size_t m = size_t(r / rep) * dim + j;
      const double xhat = (static_cast<float>(x[size_t(r) * dim + j]) - mean) / std::sqrt(var + double(eps));
      const double ref = xhat * (1.0 + static_cast<float>(scale[m])) + static_cast<float>(shift[m]);
      const double e = std::fabs(out[size_t(r) * dim + j] - ref);
      err2 += e * e;
      ref2 += ref * ref;
      worst = std::max(worst, e);
    }
  }
  const double rel = std::sqrt(err2 / ref2);
  CHECK(rel < 1e-6, "adaln %s dim %u TG %d: relative error %.3g", what, dim, TG, rel);
  CHECK(worst < 1e-5, "adaln %s dim %u TG %d: max abs error %.3g", what, dim, TG, worst);
  std::printf("[%s] adaln %-5s rows %u dim %-5u TG %-3d relative error %.2e (max abs %.2e)\n", kDialect, what, rows,
              dim, TG, rel, worst);
}

static void test_adaln() {
  check_adaln<32, float>(6, 20, 3, "f32");
  check_adaln<32, float>(4, 100, 2, "f32");
  check_adaln<64, float>(4, 5120, 4, "f32");
  check_adaln<256, float>(2, 5120, 1, "f32");
  check_adaln<256, float>(2, 20, 2, "f32");  // more threads than channels
  check_adaln<64, host_bf16>(4, 1536, 2, "bf16");
}

static void test_gated() {
  const uint32_t rows = 6, dim = 37, rep = 3, n = rows * dim;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n), y(n), gate((rows / rep) * dim), out(n);
  for (auto& v : x) v = normal(rng);
  for (auto& v : y) v = normal(rng);
  for (auto& v : gate) v = normal(rng);
  const int32_t params[3] = {int32_t(n), int32_t(dim), int32_t(rep)};
  launch_gated<float, float, float, float>(x.data(), gate.data(), y.data(), params, out.data(),
                                          elementwise_geometry(n));
  double worst = 0.0;
  for (uint32_t i = 0; i < n; ++i) {
    const double g = gate[(i / dim / rep) * dim + i % dim];
    const double ref = double(x[i]) + double(y[i]) * g;
    // x + y*gate in float32: two roundings
    const double bound = std::ldexp(std::fabs(x[i]) + std::fabs(y[i] * g) + std::fabs(ref), -23);
    const double e = std::fabs(out[i] - ref);
    worst = std::max(worst, e / (std::fabs(x[i]) + std::fabs(y[i] * g)));
    CHECK(e <= bound, "gated element %u: got %.9g expected %.9g", i, double(out[i]), ref);
  }
  std::printf("[%s] gated residual rows %u dim %u: worst error %.2e of |x| + |y*gate|\n", kDialect, rows, dim, worst);
}

// Block-sparse attention against a double-precision softmax over the keys of each row's kept tiles (+ bias).
template <int D>
static void check_sparse(uint32_t batch, uint32_t heads, uint32_t q_len, uint32_t k_len, uint32_t tile, unsigned seed) {
  const uint32_t pairs = batch * heads, q_tiles = (q_len + tile - 1) / tile, k_tiles = (k_len + tile - 1) / tile;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(size_t(pairs) * q_len * D), k(size_t(pairs) * k_len * D), v(k.size()), out(q.size());
  for (auto& x : q) x = normal(rng);
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  std::vector<float> bias(size_t(batch) * k_len, 0.0f);
  for (uint32_t j = k_len - 3; j < k_len; ++j) bias[size_t(batch - 1) * k_len + j] = -INFINITY;  // padding keys
  for (uint32_t j = 0; j < k_len; j += 5) bias[j] = 0.25f * float(j % 3);  // an additive bias
  std::vector<int32_t> ptr{0}, idx;
  std::vector<std::vector<bool>> kept(q_tiles, std::vector<bool>(k_tiles, false));
  for (uint32_t a = 0; a < q_tiles; ++a) {
    for (uint32_t b = 0; b < k_tiles; ++b) {
      kept[a][b] = a == b || (rng() % 3 == 0);
      if (kept[a][b]) idx.push_back(int32_t(b));
    }
    ptr.push_back(int32_t(idx.size()));
  }
  const float scale = 0.8f / std::sqrt(float(D));
  const int32_t params[4] = {int32_t(q_len), int32_t(k_len), int32_t(tile), int32_t(heads)};
  launch_sparse<float, D>(q.data(), k.data(), v.data(), bias.data(), ptr.data(), idx.data(), params, &scale,
                          out.data(), sparse_geometry(q_len, pairs));
  double worst = 0.0, largest = 0.0;
  for (uint32_t bh = 0; bh < pairs; ++bh) {
    for (uint32_t r = 0; r < q_len; ++r) {
      std::vector<double> w(k_len, 0.0);
      double top = -INFINITY, total = 0.0;
      for (uint32_t j = 0; j < k_len; ++j) {
        if (!kept[r / tile][j / tile] || std::isinf(bias[size_t(bh / heads) * k_len + j])) continue;
        double s = 0.0;
        for (int d = 0; d < D; ++d)
          s += double(q[(size_t(bh) * q_len + r) * D + d]) * double(k[(size_t(bh) * k_len + j) * D + d]);
        w[j] = s * scale + bias[size_t(bh / heads) * k_len + j];
        top = std::max(top, w[j]);
      }
      for (uint32_t j = 0; j < k_len; ++j) {
        const bool use = kept[r / tile][j / tile] && !std::isinf(bias[size_t(bh / heads) * k_len + j]);
        w[j] = use ? std::exp(w[j] - top) : 0.0;
        total += w[j];
      }
      for (int d = 0; d < D; ++d) {
        double ref = 0.0;
        for (uint32_t j = 0; j < k_len; ++j) ref += w[j] * double(v[(size_t(bh) * k_len + j) * D + d]);
        ref /= total;
        worst = std::max(worst, std::fabs(out[(size_t(bh) * q_len + r) * D + d] - ref));
        largest = std::max(largest, std::fabs(ref));
      }
    }
  }
  CHECK(worst < 1e-5 * largest, "sparse attention D %d: max error %.3g of max %.3g", D, worst, largest);
  std::printf("[%s] block-sparse attention %u x %u heads, %u queries, %u keys, tile %u, D %d: max error %.2e of %.2e\n",
              kDialect, batch, heads, q_len, k_len, tile, D, worst, largest);
}

static void test_sparse() {
  check_sparse<24>(2, 3, 37, 45, 8, 1);
  check_sparse<40>(1, 2, 64, 64, 16, 2);
  check_sparse<128>(2, 1, 20, 33, 4, 3);
}

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "all";
  if (what == "fp8-dump") {
    dump_fp8();
    return 0;
  }
  bool ran = false;
  if (what == "fp8" || what == "all") test_fp8(), ran = true;
  if (what == "rope" || what == "all") test_rope(), ran = true;
  if (what == "adaln" || what == "all") test_adaln(), ran = true;
  if (what == "gated" || what == "all") test_gated(), ran = true;
  if (what == "sparse" || what == "all") test_sparse(), ran = true;
  if (!ran) {
    std::fprintf(stderr, "usage: %s [fp8|rope|adaln|gated|sparse|all|fp8-dump]\n", argv[0]);
    return 2;
  }
  if (g_failures) {
    std::fprintf(stderr, "[%s] %s: %d failure(s)\n", kDialect, what.c_str(), g_failures);
    return 1;
  }
  std::printf("[%s] %s: ok\n", kDialect, what.c_str());
  return 0;
}
