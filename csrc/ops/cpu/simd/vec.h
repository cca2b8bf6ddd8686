// Vector types and math for the vectorised float32 kernels, and the
// compile-time switches they use: every switch takes a generic lambda and
// calls it with the chosen count as a std::integral_constant.
//
// Compiled once per instruction set: each of baseline.cpp, avx2.cpp and
// avx512.cpp defines LENET_ISA, the namespace of its build, and sets its GCC
// target before including these headers. The code is written with GCC vector
// extensions, which lower to SSE, AVX2 or AVX-512 as the target allows.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../../conv_sigmoid_avgpool2d_math.h"
#include "simd_kernels.h"

#ifndef LENET_ISA
#error "define LENET_ISA to the namespace of this instruction set"
#endif

// The 16-float vectors are passed and returned by value only between inline
// functions of one translation unit, so GCC's note that their calling
// convention differs between instruction sets (-Wpsabi) concerns no call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
// The same vector with the alignment of a float, for unaligned loads and stores.
typedef float vec_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }
// The first `count` (<= kLanes) lanes of a vector, for a row's last partial
// tile. AVX-512 has masked moves; a lane loop compiles to a memcpy of the
// vector spilled to the stack, whose reload stalls on the spill.
inline void store_first(float* p, vec v, int64_t count) {
#if defined(LENET_SIMD_AVX512)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), (__m512)v);
#else
  for (int64_t l = 0; l < count; ++l) p[l] = v[l];
#endif
}
// The other lanes are zero.
inline vec load_first(const float* p, int64_t count) {
#if defined(LENET_SIMD_AVX512)
  return (vec)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
#else
  vec v{};
  for (int64_t l = 0; l < count; ++l) v[l] = p[l];
  return v;
#endif
}
// n floats; for the short rows of a padded copy, where a memcpy call costs
// more than the copy.
inline void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
  if (i < n) store_first(dst + i, load_first(src + i, n - i), n - i);
}
// For constants, which fold; a scalar operand of a vector operation is the
// way to broadcast a variable (a single vbroadcastss).
inline vec splat(float s) { return vec{} + s; }

// The sigmoid is a large share of a block with few input channels (LeNet's
// first: 25 multiply-adds per sigmoid), so each build computes it with the
// fewest instructions its instruction set allows.
#if defined(LENET_SIMD_AVX512)
constexpr float kSigmoidClampLow = -88.3762626647949f;  // 1 + e^-z overflows below

// 1 / (1 + e^-z), with e^-z = 2^t, t = -z log2(e) = n + f, n = round(t),
// |f| <= 1/2: two FMAs give f with log2(e) carried to 48 bits, so t's own
// rounding never reaches the result; a degree-5 polynomial fit for relative
// error (1.9e-7 in float32) gives 2^f, vscalefps multiplies by 2^n, and the
// division is a reciprocal estimate and one Newton step (about 2^-28).
inline vec sigmoid_vec(vec z) {
  // Past these, 1 + e^-z would overflow (z < -88.37) or e^-z is below every
  // denormal (z > 103.9); the clamp keeps +-inf from turning into NaN, and
  // leaves a sigmoid of 3.8e-39 below it (sigmoid_backward_vec makes its
  // gradient 0). vmaxps/vminps return their second operand when either is
  // NaN: a NaN z stays NaN. (A ?: select compiles to a compare and a blend.)
  const __m512 zz = _mm512_min_ps(_mm512_set1_ps(103.9f), _mm512_max_ps(_mm512_set1_ps(kSigmoidClampLow), (__m512)z));
  const __m512 minus_log2e_hi = _mm512_set1_ps(-1.44269502162933349609375f);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(zz, minus_log2e_hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fmsub_ps(zz, minus_log2e_hi, n);
  f = _mm512_fmadd_ps(zz, _mm512_set1_ps(-1.925963033500011e-08f), f);
  __m512 p = _mm512_set1_ps(1.326472731307149e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671512991189957e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550733581185341e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402224242687225e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470036506653e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  const __m512 y = _mm512_rcp14_ps(d);
  return (vec)_mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
}

// dL/dz = g s (1 - s) for dL/ds = g and s = sigmoid_vec(z); 0 below the
// clamp, as torch's is where its sigmoid is 0: an infinite x times a
// saturated unit's dL/dz is then NaN, as in torch's backward. NaN compares
// unordered, so it stays NaN. (Backward only: the forward's 3.8e-39 for 0
// is within any tolerance, and the compare would cost it time.)
inline vec sigmoid_backward_vec(vec g, vec s, vec z) {
  const __mmask16 above_clamp = _mm512_cmp_ps_mask((__m512)z, _mm512_set1_ps(kSigmoidClampLow), _CMP_NLT_UQ);
  return (vec)_mm512_maskz_mul_ps(above_clamp, (__m512)(g * s), (__m512)(1.0f - s));
}
#else
// exp(x) for float32 vectors: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2)/2,
// and a degree-6 polynomial for e^r (Cephes' expf), relative error about 2e-7.
inline vec exp_vec(vec x) {
  // Clamped so that the exponent n stays in [-126, 128], 128 giving inf: e^x
  // overflows at 88.72, and past 88.38 sigmoid_vec's 1 / (1 + e^x) is
  // below 4e-39 either way, 0 as torch's is past 88.72 (see sigmoid_vec).
  // Both comparisons are false for NaN, which passes through.
  x = x > splat(88.8f) ? splat(88.8f) : x;
  x = x < splat(-87.3365478515625f) ? splat(-87.3365478515625f) : x;
  const vec t = x * 1.44269504088896341f + 0.5f;
  ivec n = __builtin_convertvector(t, ivec);  // truncates towards zero ...
  n += (__builtin_convertvector(n, vec) > t);  // ... so step down where that rounded up (true is -1)
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline vec sigmoid_vec(vec z) {
  return 1.0f / (1.0f + exp_vec(-z));  // 0 where e^-z is inf (z < -88.38)
}

// dL/dz = g s (1 - s) for dL/ds = g and s = sigmoid_vec(z): 0 where s is,
// as torch's is where its sigmoid is 0, so that an infinite x times a
// saturated unit's dL/dz is NaN, as in torch's backward.
inline vec sigmoid_backward_vec(vec g, vec s, vec) { return g * s * (1.0f - s); }
#endif

// v rounded up to a whole number of vectors.
inline int64_t round16(int64_t v) { return (v + kLanes - 1) / kLanes * kLanes; }

// Calls f(std::integral_constant<int, KERNEL>): KERNEL is LeNet's kernel size
// 5, whose tap loops then unroll into constant offsets, or 0 for any other
// size, which the kernels read from g.
template <typename F>
inline void with_kernel_size(const ConvPoolGeometry& g, F&& f) {
  if (g.kernel == 5) f(std::integral_constant<int, 5>{});
  else f(std::integral_constant<int, 0>{});
}

// Calls block(std::integral_constant<int, CB>{}, c0) over `channels`
// channels in blocks of CB <= 6 from c0, which keeps 6 * 4 accumulators in
// registers.
template <typename Block>
inline void for_each_channel_block(int64_t channels, Block&& block) {
  for (int64_t c0 = 0; c0 < channels; c0 += 6) {
    switch (channels - c0 < 6 ? channels - c0 : 6) {
      case 1: block(std::integral_constant<int, 1>{}, c0); break;
      case 2: block(std::integral_constant<int, 2>{}, c0); break;
      case 3: block(std::integral_constant<int, 3>{}, c0); break;
      case 4: block(std::integral_constant<int, 4>{}, c0); break;
      case 5: block(std::integral_constant<int, 5>{}, c0); break;
      default: block(std::integral_constant<int, 6>{}, c0); break;
    }
  }
}

// Calls taps(std::integral_constant<int, TAPS>{}, kw0) over the K taps of a
// kernel row in blocks of up to 8.
template <typename Taps>
inline void for_each_tap_block(int64_t K, Taps&& taps) {
  int64_t kw0 = 0;
  for (; kw0 + 8 <= K; kw0 += 8) taps(std::integral_constant<int, 8>{}, kw0);
  switch (K - kw0) {
    case 7: taps(std::integral_constant<int, 7>{}, kw0); break;
    case 6: taps(std::integral_constant<int, 6>{}, kw0); break;
    case 5: taps(std::integral_constant<int, 5>{}, kw0); break;
    case 4: taps(std::integral_constant<int, 4>{}, kw0); break;
    case 3: taps(std::integral_constant<int, 3>{}, kw0); break;
    case 2: taps(std::integral_constant<int, 2>{}, kw0); break;
    case 1: taps(std::integral_constant<int, 1>{}, kw0); break;
    default: break;
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
