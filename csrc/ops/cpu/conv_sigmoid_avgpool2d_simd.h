// Vectorised float32 CPU kernels of the fused conv -> sigmoid -> avgpool
// operator. The file is compiled once per instruction set (isa/*.cpp), each
// time inside its own namespace LENET_ISA and under a GCC target pragma; the
// code is written with GCC vector extensions, which lower to SSE, AVX2 or
// AVX-512 as the target allows. conv_sigmoid_avgpool2d_cpu.cpp picks one at
// run time.
//
// Vector layouts, each where it fills the lanes best:
//  * forward and dz, many channels: lanes are 16 output channels. LeNet's
//    second block has exactly 16, and a whole strip of conv outputs of one
//    channel block stays in registers through the sigmoid and the pooling.
//  * forward and dz, few channels and a 2x2 pool: lanes are 16 pooled
//    columns (LeNet's first block fills 14 of them, where its 6 channels
//    would fill 6). x is split into even and odd columns, so each of the four
//    conv outputs under a pooled output is a plain vector of its own.
//  * grad_x, column-lane blocks: lanes are 16 columns of a row, read from dz
//    stored as planes with a zero border, so no tap needs a bounds check.
//  * grad_x, channel-lane blocks: lanes are 16 images, so that each input
//    position sums exactly its own taps (LeNet's second block would
//    otherwise read a zero border on 37% of them); dz goes in and grad_x
//    comes out through 16 x 16 register transposes.
//  * grad_weight: the lanes of the dz pass (channels or pooled columns),
//    summed once per batch chunk. The column-lane path adds each tile's
//    share as soon as its dz is computed, so its dz never goes to memory
//    unless grad_x needs it.
//
// The scalar reference of the same math is ../conv_sigmoid_avgpool2d_math.h, which
// the CUDA kernels and the generic CPU path run.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../conv_sigmoid_avgpool2d_math.h"
#include "simd_kernels.h"

#ifndef LENET_ISA
#error "define LENET_ISA to the namespace of this instruction set"
#endif

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
// The same vector with the alignment of a float, for unaligned loads and stores.
typedef float vec_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec_unaligned*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec_unaligned*>(p) = v; }
// For constants, which fold; a scalar operand of a vector operation is the
// way to broadcast a variable (a single vbroadcastss).
inline vec splat(float s) { return vec{} + s; }

// The sigmoid is a large share of a block with few input channels (LeNet's
// first: 25 multiply-adds per sigmoid), so each build computes it with the
// fewest instructions its instruction set allows.
#if defined(LENET_SIMD_AVX512)
// 1 / (1 + e^-z), with e^-z = 2^t, t = -z log2(e) = n + f, n = round(t),
// |f| <= 1/2: two FMAs give f with log2(e) carried to 48 bits, so t's own
// rounding never reaches the result; a degree-5 polynomial fit for relative
// error (1.9e-7 in float32) gives 2^f, vscalefps multiplies by 2^n, and the
// division is a reciprocal estimate and one Newton step (about 2^-28).
inline vec sigmoid_vec(vec z) {
  // Past these, 1 + e^-z would overflow (z < -88.37) or e^-z is below every
  // denormal (z > 103.9); the clamp keeps +-inf from turning into NaN.
  // vmaxps/vminps return their second operand when either is NaN: a NaN z
  // stays NaN. (A ?: select compiles to a compare and a blend.)
  const __m512 zz = _mm512_min_ps(_mm512_set1_ps(103.9f), _mm512_max_ps(_mm512_set1_ps(-88.3762626647949f), (__m512)z));
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
#else
// exp(x) for float32 vectors: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2)/2,
// and a degree-6 polynomial for e^r (Cephes' expf), relative error about 2e-7.
inline vec exp_vec(vec x) {
  // Clamped so that both comparisons are false for NaN, which passes through.
  x = x > splat(88.3762626647949f) ? splat(88.3762626647949f) : x;
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
  return 1.0f / (1.0f + exp_vec(-z));  // finite: exp_vec clamps its argument at 88.38
}
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

// Sizes of the per-thread buffers, all in floats.
struct Workspace {
  int64_t xp_height, xp_width;   // x of one image with `padding` zeros around, plus slack columns
  int64_t dz_border;             // zero rows/columns before dz, K - 1
  int64_t dz_height, dz_width;   // dz planes with their zero border
  int64_t channel_blocks;        // ceil(C_out / 16)
  int64_t half_width;            // columns of xp's even and odd halves, plus slack

  explicit Workspace(const ConvPoolGeometry& g) {
    const int64_t ext_h = g.out_height * g.pool, ext_w = g.out_width * g.pool;
    const auto max = [](int64_t a, int64_t b) { return a > b ? a : b; };
    xp_height = g.height + 2 * g.padding;
    xp_width = max(g.width + 2 * g.padding, round16(ext_w) + g.kernel - 1);
    dz_border = g.kernel - 1;
    dz_height = dz_border + max(ext_h, g.height + g.padding);
    dz_width = dz_border + max(round16(ext_w), round16(g.width) + g.padding);
    channel_blocks = (g.out_channels + kLanes - 1) / kLanes;
    half_width = (xp_width + 1) / 2 + kLanes;
  }
  // xp, then its even and odd columns: [C_in][2][xp_height][half_width].
  int64_t halves_offset(const ConvPoolGeometry& g) const { return g.in_channels * xp_height * xp_width; }
  int64_t xp_size(const ConvPoolGeometry& g) const {
    return halves_offset(g) + g.in_channels * 2 * xp_height * half_width;
  }
  // The column-lane path keeps dz as planes [C_out][dz_height][dz_width].
  // The channel-lane path keeps, for a group of up to 16 images, each
  // image's dz as vectors of 16 channels ([16 images][channel blocks][ext_h]
  // [ext_w][16]), then the same dz with lanes over the images ([channel
  // blocks * 16][ext_h][ext_w][16]) and the input gradient likewise ([C_in]
  // [H * W rounded up to 16][16]); see input_grad_batch_block.
  int64_t dz_lanes_image_size(const ConvPoolGeometry& g) const {
    return channel_blocks * g.out_height * g.pool * g.out_width * g.pool * kLanes;
  }
  int64_t dz_batch_offset(const ConvPoolGeometry& g) const { return kLanes * dz_lanes_image_size(g); }
  int64_t grad_batch_offset(const ConvPoolGeometry& g) const { return 2 * kLanes * dz_lanes_image_size(g); }
  int64_t grad_batch_plane(const ConvPoolGeometry& g) const { return round16(g.height * g.width); }
  int64_t dz_size(const ConvPoolGeometry& g, bool column_lanes) const {
    if (column_lanes) return g.out_channels * dz_height * dz_width;
    return grad_batch_offset(g) + g.in_channels * grad_batch_plane(g) * kLanes;
  }
};

// Copies image n into xp's interior; the zero border was set once.
inline void load_padded_image(const ConvPoolGeometry& g, const Workspace& ws, const float* x_image, float* xp) {
  for (int64_t ci = 0; ci < g.in_channels; ++ci)
    for (int64_t ih = 0; ih < g.height; ++ih)
      std::memcpy(xp + (ci * ws.xp_height + ih + g.padding) * ws.xp_width + g.padding,
                  x_image + (ci * g.height + ih) * g.width, g.width * sizeof(float));
}

// Whether lanes over pooled columns fill more lanes than lanes over channels.
inline bool use_column_lanes(const ConvPoolGeometry& g) {
  return g.pool == 2 && g.out_width * round16(g.out_channels) > g.out_channels * round16(g.out_width);
}

// Splits xp into its even and odd columns; their slack columns stay zero.
inline void split_columns(const ConvPoolGeometry& g, const Workspace& ws, float* xp) {
  float* halves = xp + ws.halves_offset(g);
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    for (int64_t r = 0; r < ws.xp_height; ++r) {
      const float* src = xp + (ci * ws.xp_height + r) * ws.xp_width;
      float* even = halves + ((ci * 2) * ws.xp_height + r) * ws.half_width;
      float* odd = halves + ((ci * 2 + 1) * ws.xp_height + r) * ws.half_width;
      for (int64_t m = 0; 2 * m < ws.xp_width; ++m) even[m] = src[2 * m];
      for (int64_t m = 0; 2 * m + 1 < ws.xp_width; ++m) odd[m] = src[2 * m + 1];
    }
  }
}

// The x vectors tap (kh, kw) meets in a tile of pooled row ph and pooled
// columns j0 .. j0 + 15: v[dy][dx] for conv output (2 ph + dy, 2 j + dx).
// Conv column 2 j + dx + kw of xp is column j + (dx + kw) / 2 of its even or
// odd half, so each is one unaligned load. tile_even points at row 2 ph,
// column j0 of an input channel's even half.
inline void load_tap_vectors(const Workspace& ws, const float* tile_even, int64_t kh, int64_t kw,
                             vec (&v)[2][2]) {
  const int64_t plane = ws.xp_height * ws.half_width;  // from the even half to the odd one
  for (int dy = 0; dy < 2; ++dy) {
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t t = dx + kw;
      v[dy][dx] = load(tile_even + (t & 1) * plane + (dy + kh) * ws.half_width + (t >> 1));
    }
  }
}

inline const float* tile_even(const ConvPoolGeometry& g, const Workspace& ws, const float* xp, int64_t ci,
                              int64_t ph, int64_t j0) {
  return xp + ws.halves_offset(g) + (ci * 2 * ws.xp_height + 2 * ph) * ws.half_width + j0;
}

// z, less the bias, for CB channels from co0 under pooled row ph and pooled
// columns j0 .. j0 + 15: acc[c][dy][dx] is conv output (2 ph + dy, 2 j + dx).
// KERNEL: see with_kernel_size.
template <int CB, int KERNEL>
inline void column_conv(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                        const float* packed_weights, int64_t co0, int64_t ph, int64_t j0,
                        vec (&acc)[CB][2][2]) {
  const int64_t K = KERNEL ? KERNEL : g.kernel;
  const int64_t taps = K * K;
  for (int c = 0; c < CB; ++c)
    for (int dy = 0; dy < 2; ++dy)
      for (int dx = 0; dx < 2; ++dx) acc[c][dy][dx] = vec{};
  // Channel co0 + c's taps for input channel 0, a stride of 16 apart.
  const float* filter[CB];
  for (int c = 0; c < CB; ++c)
    filter[c] = packed_weights + ((co0 + c) / kLanes) * g.in_channels * taps * kLanes + (co0 + c) % kLanes;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    const float* even = tile_even(g, ws, xp, ci, ph, j0);
    for (int64_t kh = 0; kh < K; ++kh) {
      for (int64_t kw = 0; kw < K; ++kw) {
        // The four x vectors, then one channel's weight at a time: 24
        // accumulators + 4 + 1 fit the 32 registers; six live weights would not.
        vec v[2][2];
        load_tap_vectors(ws, even, kh, kw, v);
        for (int c = 0; c < CB; ++c) {
          const float wk = filter[c][(ci * taps + kh * K + kw) * kLanes];
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) acc[c][dy][dx] += v[dy][dx] * wk;
        }
      }
    }
  }
}

// Runs tile(acc, ph, j0, cols) for every tile of 16 pooled columns of every
// pooled row, acc holding its z (less the bias) for CB channels from co0.
template <int CB, typename Tile>
inline void for_each_column_tile(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                                 const float* packed_weights, int64_t co0, Tile&& tile) {
  for (int64_t ph = 0; ph < g.out_height; ++ph) {
    for (int64_t j0 = 0; j0 < g.out_width; j0 += kLanes) {
      vec acc[CB][2][2];
      with_kernel_size(g, [&](auto kernel) {
        column_conv<CB, decltype(kernel)::value>(g, ws, xp, packed_weights, co0, ph, j0, acc);
      });
      tile(acc, ph, j0, g.out_width - j0 < kLanes ? g.out_width - j0 : kLanes);
    }
  }
}

template <int CB>
inline void column_forward_block(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                                 const float* packed_weights, const float* packed_bias, int64_t co0,
                                 float* out_image) {
  for_each_column_tile<CB>(g, ws, xp, packed_weights, co0,
                           [&](vec (&acc)[CB][2][2], int64_t ph, int64_t j0, int64_t cols) {
    for (int c = 0; c < CB; ++c) {
      const float b = packed_bias[co0 + c];
      vec sum{};
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) sum += sigmoid_vec(acc[c][dy][dx] + b);
      sum *= 0.25f;
      float* dst = out_image + ((co0 + c) * g.out_height + ph) * g.out_width + j0;
      if (cols == kLanes) store(dst, sum);
      else for (int64_t l = 0; l < cols; ++l) dst[l] = sum[l];
    }
  });
}

// Adds one tile's dL/dweight, lanes unsummed, to grad_weight_lanes
// ([C_out][C_in][K][K][16]): d[c][dy][dx] is dL/dz under the tile's pooled
// outputs, and each tap reads the same x vectors as column_conv.
template <int CB, int KERNEL>
inline void column_weight_grad_tile(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                                    const vec (&d)[CB][2][2], int64_t co0, int64_t ph, int64_t j0,
                                    float* grad_weight_lanes) {
  const int64_t K = KERNEL ? KERNEL : g.kernel;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    const float* even = tile_even(g, ws, xp, ci, ph, j0);
    for (int64_t kh = 0; kh < K; ++kh) {
      for (int64_t kw = 0; kw < K; ++kw) {
        vec v[2][2];
        load_tap_vectors(ws, even, kh, kw, v);
        for (int c = 0; c < CB; ++c) {
          float* dst = grad_weight_lanes + ((((co0 + c) * g.in_channels + ci) * K + kh) * K + kw) * kLanes;
          vec acc = load(dst);
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) acc += d[c][dy][dx] * v[dy][dx];
          store(dst, acc);
        }
      }
    }
  }
}

// dL/dz of CB channels from co0, recomputed tile by tile. It goes straight
// into the weight gradient (when grad_weight_lanes is set) and into the dz
// planes only when the input gradient needs them (dz_planes set).
template <int CB>
inline void column_dz_block(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                            const float* packed_weights, const float* packed_bias, int64_t co0,
                            const float* grad_image, float* dz_planes, float* grad_weight_lanes,
                            float* grad_bias) {
  vec bias_sum[CB] = {};
  for_each_column_tile<CB>(g, ws, xp, packed_weights, co0,
                           [&](vec (&acc)[CB][2][2], int64_t ph, int64_t j0, int64_t cols) {
    vec d[CB][2][2];
    for (int c = 0; c < CB; ++c) {
      const float b = packed_bias[co0 + c];
      vec go{};  // lanes past the last column stay zero, and so does their dz
      const float* src = grad_image + ((co0 + c) * g.out_height + ph) * g.out_width + j0;
      for (int64_t l = 0; l < cols; ++l) go[l] = src[l];
      go *= 0.25f;
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          const vec s = sigmoid_vec(acc[c][dy][dx] + b);
          d[c][dy][dx] = go * s * (1.0f - s);
          bias_sum[c] += d[c][dy][dx];
        }
      }
    }
    if (grad_weight_lanes)
      with_kernel_size(g, [&](auto kernel) {
        column_weight_grad_tile<CB, decltype(kernel)::value>(g, ws, xp, d, co0, ph, j0, grad_weight_lanes);
      });
    if (!dz_planes) return;
    for (int c = 0; c < CB; ++c) {
      for (int dy = 0; dy < 2; ++dy) {
        float* dst = dz_planes + ((co0 + c) * ws.dz_height + ws.dz_border + 2 * ph + dy) * ws.dz_width +
                     ws.dz_border + 2 * j0;
        for (int dx = 0; dx < 2; ++dx)
          for (int64_t l = 0; l < cols; ++l) dst[2 * l + dx] = d[c][dy][dx][l];
      }
    }
  });
  for (int c = 0; c < CB; ++c)
    for (int l = 0; l < kLanes; ++l) grad_bias[co0 + c] += bias_sum[c][l];
}

// Runs Block<CB>::run(g, c0, args...) over `channels` channels in blocks of
// up to 6, which keeps 6 * 4 accumulators in registers.
template <template <int> class Block, typename... Args>
inline void for_each_channel_block(const ConvPoolGeometry& g, int64_t channels, Args&&... args) {
  for (int64_t c0 = 0; c0 < channels; c0 += 6) {
    switch (channels - c0 < 6 ? channels - c0 : 6) {
      case 1: Block<1>::run(g, c0, args...); break;
      case 2: Block<2>::run(g, c0, args...); break;
      case 3: Block<3>::run(g, c0, args...); break;
      case 4: Block<4>::run(g, c0, args...); break;
      case 5: Block<5>::run(g, c0, args...); break;
      default: Block<6>::run(g, c0, args...); break;
    }
  }
}

template <int CB>
struct ColumnForward {
  static void run(const ConvPoolGeometry& g, int64_t co0, const Workspace& ws, const float* xp,
                  const float* w, const float* b, float* out_image) {
    column_forward_block<CB>(g, ws, xp, w, b, co0, out_image);
  }
};

template <int CB>
struct ColumnDz {
  static void run(const ConvPoolGeometry& g, int64_t co0, const Workspace& ws, const float* xp,
                  const float* w, const float* b, const float* grad_image, float* dz_planes,
                  float* grad_weight_lanes, float* grad_bias) {
    column_dz_block<CB>(g, ws, xp, w, b, co0, grad_image, dz_planes, grad_weight_lanes, grad_bias);
  }
};

// z for a strip of PW pooled outputs of pooled row ph, for one block of 16
// output channels: P * P * PW accumulators, all in registers. Accumulator
// (dy, c) is conv output (ph * P + dy, pw0 * P + c).
// weights: [C_in][K][K][16] of this channel block; bias: [16]. KERNEL: see
// with_kernel_size.
template <int P, int PW, int KERNEL>
inline void conv_strip(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                       const float* weights, const float* bias, int64_t ph, int64_t pw0,
                       vec (&acc)[P][P * PW]) {
  const vec b = load(bias);
  for (int dy = 0; dy < P; ++dy)
    for (int c = 0; c < P * PW; ++c) acc[dy][c] = b;
  const int64_t K = KERNEL ? KERNEL : g.kernel;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    for (int64_t kh = 0; kh < K; ++kh) {
      const float* row = xp + (ci * ws.xp_height + ph * P + kh) * ws.xp_width + pw0 * P;
      const float* w = weights + ((ci * K + kh) * K) * kLanes;
      for (int64_t kw = 0; kw < K; ++kw) {
        const vec wv = load(w + kw * kLanes);
        for (int dy = 0; dy < P; ++dy)
          for (int c = 0; c < P * PW; ++c) acc[dy][c] += wv * row[dy * ws.xp_width + c + kw];
      }
    }
  }
}

template <int P, int PW>
inline void forward_strip(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                          const float* weights, const float* bias, int64_t co0, int64_t ph,
                          int64_t pw0, float* out_image) {
  vec acc[P][P * PW];
  with_kernel_size(g, [&](auto kernel) {
    conv_strip<P, PW, decltype(kernel)::value>(g, ws, xp, weights, bias, ph, pw0, acc);
  });
  const int64_t lanes = g.out_channels - co0 < kLanes ? g.out_channels - co0 : kLanes;
  for (int q = 0; q < PW; ++q) {
    vec sum{};
    for (int dy = 0; dy < P; ++dy)
      for (int dx = 0; dx < P; ++dx) sum += sigmoid_vec(acc[dy][q * P + dx]);
    sum *= 1.0f / float(P * P);
    float* dst = out_image + (co0 * g.out_height + ph) * g.out_width + pw0 + q;
    for (int64_t l = 0; l < lanes; ++l) dst[l * g.out_height * g.out_width] = sum[l];
  }
}

// dz = grad_out / P^2 * s * (1 - s) for the strip, stored as channel vectors
// (dz_lanes: [channel blocks][ext_h][ext_w][16]) and summed into the bias
// gradient.
template <int P, int PW>
inline void dz_strip(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                     const float* weights, const float* bias, int64_t co0, int64_t ph,
                     int64_t pw0, const float* grad_image, float* dz_lanes, vec& grad_bias) {
  vec acc[P][P * PW];
  with_kernel_size(g, [&](auto kernel) {
    conv_strip<P, PW, decltype(kernel)::value>(g, ws, xp, weights, bias, ph, pw0, acc);
  });
  const int64_t lanes = g.out_channels - co0 < kLanes ? g.out_channels - co0 : kLanes;
  const int64_t plane = g.out_height * g.out_width;
  for (int q = 0; q < PW; ++q) {
    vec go{};
    for (int64_t l = 0; l < lanes; ++l)
      go[l] = grad_image[(co0 + l) * plane + ph * g.out_width + pw0 + q];
    go *= 1.0f / float(P * P);
    for (int dy = 0; dy < P; ++dy) {
      for (int dx = 0; dx < P; ++dx) {
        const vec s = sigmoid_vec(acc[dy][q * P + dx]);
        const vec d = go * s * (1.0f - s);
        grad_bias += d;
        const int64_t oh = ph * P + dy, ow = (pw0 + q) * P + dx;
        const int64_t ext_h = g.out_height * P, ext_w = g.out_width * P;
        store(dz_lanes + (((co0 / kLanes) * ext_h + oh) * ext_w + ow) * kLanes, d);
      }
    }
  }
}

// Runs Strip over the pooled row ph in strips of PW, then one output at a time.
template <int P, int PW, typename Strip>
inline void for_each_strip(const ConvPoolGeometry& g, int64_t ph, Strip&& strip) {
  int64_t pw = 0;
  for (; pw + PW <= g.out_width; pw += PW) strip(std::integral_constant<int, PW>{}, pw);
  for (; pw < g.out_width; ++pw) strip(std::integral_constant<int, 1>{}, pw);
}

// Strip widths that keep P * P * PW accumulators within the register file.
template <int P>
struct StripWidth {
  static constexpr int value = P == 1 ? 8 : P == 2 ? 4 : 1;
};

template <int P>
void forward_pool(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                  const float* weights, const float* bias, float* out_image) {
  constexpr int PW = StripWidth<P>::value;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    const float* w = weights + cb * g.in_channels * g.kernel * g.kernel * kLanes;
    for (int64_t ph = 0; ph < g.out_height; ++ph)
      for_each_strip<P, PW>(g, ph, [&](auto width, int64_t pw0) {
        forward_strip<P, decltype(width)::value>(g, ws, xp, w, bias + cb * kLanes, cb * kLanes, ph, pw0, out_image);
      });
  }
}

template <int P>
void dz_pool(const ConvPoolGeometry& g, const Workspace& ws, const float* xp, const float* weights,
             const float* bias, const float* grad_image, float* dz_lanes, float* grad_bias) {
  constexpr int PW = StripWidth<P>::value;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    const float* w = weights + cb * g.in_channels * g.kernel * g.kernel * kLanes;
    vec gb = load(grad_bias + cb * kLanes);
    for (int64_t ph = 0; ph < g.out_height; ++ph)
      for_each_strip<P, PW>(g, ph, [&](auto width, int64_t pw0) {
        dz_strip<P, decltype(width)::value>(g, ws, xp, w, bias + cb * kLanes, cb * kLanes, ph, pw0,
                                            grad_image, dz_lanes, gb);
      });
    store(grad_bias + cb * kLanes, gb);
  }
}

// One stage of a 16 x 16 transpose: exchanges bit B of the row index with
// bit B of the lane index, between a row with that bit clear (low) and its
// partner with it set (high).
template <int B>
inline void exchange_index_bit(vec& low, vec& high) {
  const ivec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const ivec set = (lane & B) != 0;  // -1 where the lane has bit B
  const vec new_low = __builtin_shuffle(low, high, lane + (set & (kLanes - B)));
  const vec new_high = __builtin_shuffle(low, high, lane + (set & kLanes) + (~set & B));
  low = new_low;
  high = new_high;
}

template <int B>
inline void exchange_index_bit_all(vec (&rows)[kLanes]) {
  for (int i = 0; i < kLanes; ++i)
    if (!(i & B)) exchange_index_bit<B>(rows[i], rows[i + B]);
}

// Element (row i, lane l) moves to (row l, lane i).
inline void transpose16(vec (&rows)[kLanes]) {
  exchange_index_bit_all<8>(rows);
  exchange_index_bit_all<4>(rows);
  exchange_index_bit_all<2>(rows);
  exchange_index_bit_all<1>(rows);
}

// Turns the dz channel vectors of `count` images (the group's slots) into dz
// with lanes over the images: [channel blocks * 16][ext_h][ext_w][16], one
// 16 x 16 register transpose per position and channel block. The lanes of
// images past `count` come out zero.
inline void dz_batch_from_lanes(const ConvPoolGeometry& g, const Workspace& ws, const float* dz_lanes,
                                int64_t count, float* dz_batch) {
  const int64_t ext = g.out_height * g.pool * g.out_width * g.pool;
  const int64_t image_size = ws.dz_lanes_image_size(g);
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    const int64_t lanes = g.out_channels - cb * kLanes < kLanes ? g.out_channels - cb * kLanes : kLanes;
    for (int64_t pos = 0; pos < ext; ++pos) {
      vec rows[kLanes];
      for (int i = 0; i < kLanes; ++i)
        rows[i] = i < count ? load(dz_lanes + i * image_size + (cb * ext + pos) * kLanes) : vec{};
      transpose16(rows);
      for (int64_t l = 0; l < lanes; ++l) store(dz_batch + ((cb * kLanes + l) * ext + pos) * kLanes, rows[l]);
    }
  }
}

// The way back for the input gradient: from [C_in][H * W rounded up][16
// images] into the planes of the group's `count` images in grad_x.
inline void grad_x_from_batch(const ConvPoolGeometry& g, const Workspace& ws, const float* grad_batch,
                              int64_t count, float* grad_x) {
  const int64_t plane = g.height * g.width;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    for (int64_t p0 = 0; p0 < plane; p0 += kLanes) {
      vec rows[kLanes];
      for (int i = 0; i < kLanes; ++i) rows[i] = load(grad_batch + (ci * ws.grad_batch_plane(g) + p0 + i) * kLanes);
      transpose16(rows);
      const int64_t cols = plane - p0 < kLanes ? plane - p0 : kLanes;
      for (int64_t n = 0; n < count; ++n) {
        float* dst = grad_x + (n * g.in_channels + ci) * plane + p0;
        if (cols == kLanes) store(dst, rows[n]);
        else for (int64_t l = 0; l < cols; ++l) dst[l] = rows[n][l];
      }
    }
  }
}

// Pools the kernels are specialised for; others take the generic path.
inline bool supported(const ConvPoolGeometry& g) { return g.pool >= 1 && g.pool <= 4; }

inline int64_t xp_size(const ConvPoolGeometry& g) { return Workspace(g).xp_size(g); }
inline int64_t dz_size(const ConvPoolGeometry& g) { return Workspace(g).dz_size(g, use_column_lanes(g)); }

// Forward of images [n_begin, n_end). weights/bias are packed by channel
// block (see conv_strip); xp is a zeroed buffer of ws.xp_size(g) floats.
inline void forward_images(const ConvPoolGeometry& g, const float* x, const float* weights,
                           const float* bias, float* out, int64_t n_begin, int64_t n_end, float* xp) {
  const Workspace ws(g);
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_padded_image(g, ws, x + n * g.in_channels * g.height * g.width, xp);
    float* out_image = out + n * g.out_channels * g.out_height * g.out_width;
    if (use_column_lanes(g)) {
      split_columns(g, ws, xp);
      for_each_channel_block<ColumnForward>(g, g.out_channels, ws, xp, weights, bias, out_image);
      continue;
    }
    switch (g.pool) {
      case 1: forward_pool<1>(g, ws, xp, weights, bias, out_image); break;
      case 2: forward_pool<2>(g, ws, xp, weights, bias, out_image); break;
      case 3: forward_pool<3>(g, ws, xp, weights, bias, out_image); break;
      default: forward_pool<4>(g, ws, xp, weights, bias, out_image); break;
    }
  }
}

// dL/dx for ROWS input rows from ih0 and CB input channels from ci0, from the
// dz planes: lanes are 16 input columns. Each dz vector loaded feeds all CB
// channels (their weights are broadcasts), as in the forward strip; ROWS and
// CB are compile-time counts so that the ROWS * CB accumulators stay in
// registers. KERNEL: see with_kernel_size.
template <int ROWS, int CB, int KERNEL>
inline void input_grad_block(const ConvPoolGeometry& g, const Workspace& ws, const float* dz,
                             const float* weight, int64_t ci0, int64_t ih0, float* grad_image) {
  const int64_t K = KERNEL ? KERNEL : g.kernel;
  // Kernel rows that reach a dz row of the pooled extent from some row of the
  // block; the others would read only dz's zero border.
  const int64_t ext_h = g.out_height * g.pool;
  const int64_t kh_begin = ih0 + g.padding - (ext_h - 1) > 0 ? ih0 + g.padding - (ext_h - 1) : 0;
  const int64_t kh_end = ih0 + ROWS + g.padding < K ? ih0 + ROWS + g.padding : K;
  for (int64_t iw0 = 0; iw0 < g.width; iw0 += kLanes) {
    vec acc[ROWS][CB] = {};
    for (int64_t co = 0; co < g.out_channels; ++co) {
      const float* w = weight + (co * g.in_channels + ci0) * K * K;
      const float* plane = dz + co * ws.dz_height * ws.dz_width;
      for (int64_t kh = kh_begin; kh < kh_end; ++kh) {
        // dz row of input row ih: ih + padding - kh, shifted by the border.
        const float* base = plane + (ih0 + g.padding - kh + ws.dz_border) * ws.dz_width + iw0 +
                            g.padding + ws.dz_border;
        for (int64_t kw = 0; kw < K; ++kw) {
          float wk[CB];
          for (int c = 0; c < CB; ++c) wk[c] = w[c * K * K + kh * K + kw];
          for (int r = 0; r < ROWS; ++r) {
            const vec v = load(base + r * ws.dz_width - kw);
            for (int c = 0; c < CB; ++c) acc[r][c] += v * wk[c];
          }
        }
      }
    }
    const int64_t cols = g.width - iw0 < kLanes ? g.width - iw0 : kLanes;
    for (int r = 0; r < ROWS; ++r) {
      for (int c = 0; c < CB; ++c) {
        float* dst = grad_image + ((ci0 + c) * g.height + ih0 + r) * g.width + iw0;
        if (cols == kLanes) store(dst, acc[r][c]);
        else for (int64_t l = 0; l < cols; ++l) dst[l] = acc[r][c][l];
      }
    }
  }
}

template <int CB>
struct InputGradChannels {
  static void run(const ConvPoolGeometry& g, int64_t ci0, const Workspace& ws, const float* dz,
                  const float* weight, float* grad_image) {
    with_kernel_size(g, [&](auto kernel) {
      constexpr int K = decltype(kernel)::value;
      int64_t ih0 = 0;
      for (; ih0 + 2 <= g.height; ih0 += 2) input_grad_block<2, CB, K>(g, ws, dz, weight, ci0, ih0, grad_image);
      if (ih0 < g.height) input_grad_block<1, CB, K>(g, ws, dz, weight, ci0, ih0, grad_image);
    });
  }
};

// dL/dx of CB input channels from ci0 for a group of up to 16 images, lanes
// over the images: each input position sums exactly its own taps, the ones
// that reach the pooled extent of dz, so none reads a zero border (with
// lanes over columns, 37% of LeNet's second block's would). Weights are
// broadcasts. KERNEL: see with_kernel_size.
template <int CB, int KERNEL>
inline void input_grad_batch_block(const ConvPoolGeometry& g, const Workspace& ws, const float* dz_batch,
                                   const float* weight, int64_t ci0, float* grad_batch) {
  const int64_t K = KERNEL ? KERNEL : g.kernel;
  const int64_t ext_h = g.out_height * g.pool, ext_w = g.out_width * g.pool;
  const auto max = [](int64_t a, int64_t b) { return a > b ? a : b; };
  const auto min = [](int64_t a, int64_t b) { return a < b ? a : b; };
  for (int64_t ih = 0; ih < g.height; ++ih) {
    // Input row ih meets dz row ih + padding - kh.
    const int64_t kh_begin = max(0, ih + g.padding - ext_h + 1), kh_end = min(K, ih + g.padding + 1);
    for (int64_t iw = 0; iw < g.width; ++iw) {
      const int64_t kw_begin = max(0, iw + g.padding - ext_w + 1), kw_end = min(K, iw + g.padding + 1);
      vec acc[CB] = {};
      for (int64_t co = 0; co < g.out_channels; ++co) {
        const float* w = weight + (co * g.in_channels + ci0) * K * K;
        for (int64_t kh = kh_begin; kh < kh_end; ++kh) {
          const float* d = dz_batch + ((co * ext_h + ih + g.padding - kh) * ext_w + iw + g.padding) * kLanes;
          for (int64_t kw = kw_begin; kw < kw_end; ++kw) {
            const vec v = load(d - kw * kLanes);
            for (int c = 0; c < CB; ++c) acc[c] += v * w[c * K * K + kh * K + kw];
          }
        }
      }
      for (int c = 0; c < CB; ++c)
        store(grad_batch + ((ci0 + c) * ws.grad_batch_plane(g) + ih * g.width + iw) * kLanes, acc[c]);
    }
  }
}

template <int CB>
struct InputGradBatchChannels {
  static void run(const ConvPoolGeometry& g, int64_t ci0, const Workspace& ws, const float* dz_batch,
                  const float* weight, float* grad_batch) {
    with_kernel_size(g, [&](auto kernel) {
      input_grad_batch_block<CB, decltype(kernel)::value>(g, ws, dz_batch, weight, ci0, grad_batch);
    });
  }
};

// Adds TAPS taps (kw0 ...) of one image's dL/dweight[channel block][ci][kh]
// to acc_out, from dz as channel vectors: lanes are 16 output channels, and
// each tap is a broadcast of x.
template <int TAPS>
inline void weight_grad_channel_taps(const ConvPoolGeometry& g, const Workspace& ws,
                                     const float* dz_lanes, const float* x_rows, float* acc_out) {
  const int64_t ext_h = g.out_height * g.pool, ext_w = g.out_width * g.pool;
  vec acc[TAPS] = {};
  for (int64_t oh = 0; oh < ext_h; ++oh) {
    const float* xrow = x_rows + oh * ws.xp_width;
    const float* drow = dz_lanes + oh * ext_w * kLanes;
    for (int64_t ow = 0; ow < ext_w; ++ow) {
      const vec d = load(drow + ow * kLanes);
      for (int t = 0; t < TAPS; ++t) acc[t] += d * xrow[ow + t];
    }
  }
  for (int t = 0; t < TAPS; ++t) store(acc_out + t * kLanes, load(acc_out + t * kLanes) + acc[t]);
}

// Runs Taps<4> over the kernel's columns, then the remainder, for one kernel row.
template <template <int> class Taps, typename... Args>
inline void for_each_tap_block(int64_t K, Args&&... args) {
  int64_t kw0 = 0;
  for (; kw0 + 8 <= K; kw0 += 8) Taps<8>::run(kw0, args...);
  switch (K - kw0) {
    case 7: Taps<7>::run(kw0, args...); break;
    case 6: Taps<6>::run(kw0, args...); break;
    case 5: Taps<5>::run(kw0, args...); break;
    case 4: Taps<4>::run(kw0, args...); break;
    case 3: Taps<3>::run(kw0, args...); break;
    case 2: Taps<2>::run(kw0, args...); break;
    case 1: Taps<1>::run(kw0, args...); break;
    default: break;
  }
}

template <int TAPS>
struct ChannelWeightTaps {
  static void run(int64_t kw0, const ConvPoolGeometry& g, const Workspace& ws, const float* dz_lanes,
                  const float* x_rows, float* acc_out) {
    weight_grad_channel_taps<TAPS>(g, ws, dz_lanes, x_rows + kw0, acc_out + kw0 * kLanes);
  }
};

// Adds one image's dL/dweight, lanes unsummed, to grad_weight_lanes, from dz
// as channel vectors (the channel-lane path; the column-lane path adds its
// weight gradient while it computes dz).
inline void weight_grad_image(const ConvPoolGeometry& g, const Workspace& ws, const float* dz_lanes,
                              const float* xp, float* grad_weight_lanes) {
  const int64_t K = g.kernel;
  const int64_t ext = g.out_height * g.pool * g.out_width * g.pool;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb)
    for (int64_t ci = 0; ci < g.in_channels; ++ci)
      for (int64_t kh = 0; kh < K; ++kh)
        for_each_tap_block<ChannelWeightTaps>(
            K, g, ws, dz_lanes + cb * ext * kLanes,
            xp + (ci * ws.xp_height + kh) * ws.xp_width,
            grad_weight_lanes + (((cb * g.in_channels + ci) * K + kh) * K) * kLanes);
}

// Sums the lanes of grad_weight_lanes into out ([C_out][C_in][K][K]). With
// column lanes it is [C_out][C_in][K][K][16 pooled columns]; with channel lanes
// [channel blocks][C_in][K][K][16 channels].
inline void sum_weight_lanes(const ConvPoolGeometry& g, const float* lanes, float* out) {
  const int64_t per_channel = g.in_channels * g.kernel * g.kernel;
  const bool columns = use_column_lanes(g);
  for (int64_t co = 0; co < g.out_channels; ++co) {
    for (int64_t i = 0; i < per_channel; ++i) {
      if (columns) {
        float sum = 0;
        for (int l = 0; l < kLanes; ++l) sum += lanes[(co * per_channel + i) * kLanes + l];
        out[co * per_channel + i] = sum;
      } else {
        out[co * per_channel + i] = lanes[((co / kLanes) * per_channel + i) * kLanes + co % kLanes];
      }
    }
  }
}

// Backward of images [n_begin, n_end). grad_weight_lanes ([C_out][C_in][K][K][16])
// and grad_bias_lanes ([channel blocks][16]) accumulate across calls; the
// caller sums their lanes. xp and dz are zeroed buffers of xp_size(g) and
// dz_size(g) floats. weight is the unpacked (C_out, C_in, K, K) weight.
inline void backward_images(const ConvPoolGeometry& g, const float* grad_out, const float* x,
                            const float* packed_weights, const float* packed_bias,
                            const float* weight, float* grad_x, float* grad_weight_lanes,
                            float* grad_bias_lanes, int64_t n_begin, int64_t n_end, float* xp,
                            float* dz) {
  const Workspace ws(g);
  const int64_t image_numel = g.in_channels * g.height * g.width;
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_padded_image(g, ws, x + n * image_numel, xp);
    const float* grad_image = grad_out + n * g.out_channels * g.out_height * g.out_width;
    if (use_column_lanes(g)) {
      split_columns(g, ws, xp);
      for_each_channel_block<ColumnDz>(g, g.out_channels, ws, xp, packed_weights, packed_bias, grad_image,
                                       grad_x ? dz : nullptr, grad_weight_lanes, grad_bias_lanes);
      if (grad_x)
        for_each_channel_block<InputGradChannels>(g, g.in_channels, ws, dz, weight, grad_x + n * image_numel);
      continue;
    }
    // The image's slot in its group of 16, whose input gradients are
    // computed together once the group is complete.
    const int64_t slot = (n - n_begin) % kLanes;
    float* dz_lanes = dz + slot * ws.dz_lanes_image_size(g);
    switch (g.pool) {
      case 1: dz_pool<1>(g, ws, xp, packed_weights, packed_bias, grad_image, dz_lanes, grad_bias_lanes); break;
      case 2: dz_pool<2>(g, ws, xp, packed_weights, packed_bias, grad_image, dz_lanes, grad_bias_lanes); break;
      case 3: dz_pool<3>(g, ws, xp, packed_weights, packed_bias, grad_image, dz_lanes, grad_bias_lanes); break;
      default: dz_pool<4>(g, ws, xp, packed_weights, packed_bias, grad_image, dz_lanes, grad_bias_lanes); break;
    }
    if (grad_weight_lanes) weight_grad_image(g, ws, dz_lanes, xp, grad_weight_lanes);
    if (grad_x && (slot == kLanes - 1 || n == n_end - 1)) {
      float* dz_batch = dz + ws.dz_batch_offset(g);
      float* grad_batch = dz + ws.grad_batch_offset(g);
      dz_batch_from_lanes(g, ws, dz, slot + 1, dz_batch);
      for_each_channel_block<InputGradBatchChannels>(g, g.in_channels, ws, dz_batch, weight, grad_batch);
      grad_x_from_batch(g, ws, grad_batch, slot + 1, grad_x + (n - slot) * image_numel);
    }
  }
}

const SimdKernels kernels = {&supported, &xp_size, &dz_size, &forward_images, &backward_images,
                             &sum_weight_lanes};

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
