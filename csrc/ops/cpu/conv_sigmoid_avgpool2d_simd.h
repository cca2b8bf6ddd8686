// Vectorised float32 CPU kernels of the fused conv -> sigmoid -> avgpool
// operator. The file is compiled once per instruction set (isa/*.cpp), each
// time inside its own namespace LENET_ISA and under a GCC target pragma; the
// code is written with GCC vector extensions, which lower to SSE, AVX2 or
// AVX-512 as the target allows. conv_sigmoid_avgpool2d_cpu.cpp picks one at
// run time.
//
// Two vector layouts, each where it fills the lanes best:
//  * forward and dz: lanes are 16 output channels. LeNet's second block has
//    exactly 16, and a whole strip of conv outputs of one channel block stays
//    in registers through the sigmoid and the pooling.
//  * grad_x and grad_weight: lanes are 16 columns of a row, read from dz
//    stored as planes with a zero border, so no tap needs a bounds check.
//
// The scalar reference of the same math is ../conv_sigmoid_avgpool2d.h, which
// the CUDA kernels and the generic CPU path run.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../conv_sigmoid_avgpool2d.h"
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
inline vec splat(float s) { return vec{} + s; }

// exp(x) for float32 vectors: 2^n * e^r with |r| <= ln(2)/2 and a degree-6
// polynomial for e^r (Cephes' expf), relative error about 2e-7.
inline vec exp_vec(vec x) {
  x = x < splat(88.3762626647949f) ? x : splat(88.3762626647949f);
  x = x > splat(-87.3365478515625f) ? x : splat(-87.3365478515625f);
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

inline vec sigmoid_vec(vec z) { return 1.0f / (1.0f + exp_vec(-z)); }

// Sizes of the per-thread buffers, all in floats.
struct Workspace {
  int64_t xp_height, xp_width;   // x of one image with `padding` zeros around, plus slack columns
  int64_t dz_border;             // zero rows/columns before dz, K - 1
  int64_t dz_height, dz_width;   // dz planes with their zero border
  int64_t channel_blocks;        // ceil(C_out / 16)

  explicit Workspace(const ConvPoolGeometry& g) {
    const int64_t ext_h = g.out_height * g.pool, ext_w = g.out_width * g.pool;
    const auto round16 = [](int64_t v) { return (v + kLanes - 1) / kLanes * kLanes; };
    const auto max = [](int64_t a, int64_t b) { return a > b ? a : b; };
    xp_height = g.height + 2 * g.padding;
    xp_width = max(g.width + 2 * g.padding, round16(ext_w) + g.kernel - 1);
    dz_border = g.kernel - 1;
    dz_height = dz_border + max(ext_h, g.height + g.padding);
    dz_width = dz_border + max(round16(ext_w), round16(g.width) + g.padding);
    channel_blocks = (g.out_channels + kLanes - 1) / kLanes;
  }
  int64_t xp_size(const ConvPoolGeometry& g) const { return g.in_channels * xp_height * xp_width; }
  int64_t dz_size(const ConvPoolGeometry& g) const { return g.out_channels * dz_height * dz_width; }
};

// Copies image n into xp's interior; the zero border was set once.
inline void load_padded_image(const ConvPoolGeometry& g, const Workspace& ws, const float* x_image, float* xp) {
  for (int64_t ci = 0; ci < g.in_channels; ++ci)
    for (int64_t ih = 0; ih < g.height; ++ih)
      std::memcpy(xp + (ci * ws.xp_height + ih + g.padding) * ws.xp_width + g.padding,
                  x_image + (ci * g.height + ih) * g.width, g.width * sizeof(float));
}

// z for a strip of PW pooled outputs of pooled row ph, for one block of 16
// output channels: P * P * PW accumulators, all in registers. Accumulator
// (dy, c) is conv output (ph * P + dy, pw0 * P + c).
// weights: [C_in][K][K][16] of this channel block; bias: [16].
template <int P, int PW>
inline void conv_strip(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                       const float* weights, const float* bias, int64_t ph, int64_t pw0,
                       vec (&acc)[P][P * PW]) {
  const vec b = load(bias);
  for (int dy = 0; dy < P; ++dy)
    for (int c = 0; c < P * PW; ++c) acc[dy][c] = b;
  const int64_t K = g.kernel;
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
  conv_strip<P, PW>(g, ws, xp, weights, bias, ph, pw0, acc);
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

// dz = grad_out / P^2 * s * (1 - s) for the strip, written into the dz planes
// (with their border), and summed into the bias gradient.
template <int P, int PW>
inline void dz_strip(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                     const float* weights, const float* bias, int64_t co0, int64_t ph,
                     int64_t pw0, const float* grad_image, float* dz, vec& grad_bias) {
  vec acc[P][P * PW];
  conv_strip<P, PW>(g, ws, xp, weights, bias, ph, pw0, acc);
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
        float* dst = dz + (co0 * ws.dz_height + ws.dz_border + oh) * ws.dz_width + ws.dz_border + ow;
        for (int64_t l = 0; l < lanes; ++l) dst[l * ws.dz_height * ws.dz_width] = d[l];
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
             const float* bias, const float* grad_image, float* dz, float* grad_bias) {
  constexpr int PW = StripWidth<P>::value;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    const float* w = weights + cb * g.in_channels * g.kernel * g.kernel * kLanes;
    vec gb = load(grad_bias + cb * kLanes);
    for (int64_t ph = 0; ph < g.out_height; ++ph)
      for_each_strip<P, PW>(g, ph, [&](auto width, int64_t pw0) {
        dz_strip<P, decltype(width)::value>(g, ws, xp, w, bias + cb * kLanes, cb * kLanes, ph, pw0,
                                            grad_image, dz, gb);
      });
    store(grad_bias + cb * kLanes, gb);
  }
}

// Pools the kernels are specialised for; others take the generic path.
inline bool supported(const ConvPoolGeometry& g) { return g.pool >= 1 && g.pool <= 4; }

inline int64_t xp_size(const ConvPoolGeometry& g) { return Workspace(g).xp_size(g); }
inline int64_t dz_size(const ConvPoolGeometry& g) { return Workspace(g).dz_size(g); }

// Forward of images [n_begin, n_end). weights/bias are packed by channel
// block (see conv_strip); xp is a zeroed buffer of ws.xp_size(g) floats.
inline void forward_images(const ConvPoolGeometry& g, const float* x, const float* weights,
                           const float* bias, float* out, int64_t n_begin, int64_t n_end, float* xp) {
  const Workspace ws(g);
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_padded_image(g, ws, x + n * g.in_channels * g.height * g.width, xp);
    float* out_image = out + n * g.out_channels * g.out_height * g.out_width;
    switch (g.pool) {
      case 1: forward_pool<1>(g, ws, xp, weights, bias, out_image); break;
      case 2: forward_pool<2>(g, ws, xp, weights, bias, out_image); break;
      case 3: forward_pool<3>(g, ws, xp, weights, bias, out_image); break;
      default: forward_pool<4>(g, ws, xp, weights, bias, out_image); break;
    }
  }
}

// dL/dx of one image from its dz planes: lanes are 16 input columns.
inline void input_grad_image(const ConvPoolGeometry& g, const Workspace& ws, const float* dz,
                             const float* weight, float* grad_image) {
  const int64_t K = g.kernel;
  constexpr int kRows = 4;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    for (int64_t ih0 = 0; ih0 < g.height; ih0 += kRows) {
      const int rows = g.height - ih0 < kRows ? int(g.height - ih0) : kRows;
      for (int64_t iw0 = 0; iw0 < g.width; iw0 += kLanes) {
        vec acc[kRows] = {};
        for (int64_t co = 0; co < g.out_channels; ++co) {
          const float* w = weight + (co * g.in_channels + ci) * K * K;
          const float* plane = dz + co * ws.dz_height * ws.dz_width;
          for (int64_t kh = 0; kh < K; ++kh) {
            // dz row of input row ih: ih + padding - kh, shifted by the border.
            const float* base = plane + (ih0 + g.padding - kh + ws.dz_border) * ws.dz_width +
                                iw0 + g.padding + ws.dz_border;
            for (int64_t kw = 0; kw < K; ++kw) {
              const vec wv = splat(w[kh * K + kw]);
              for (int r = 0; r < kRows; ++r)
                if (r < rows) acc[r] += wv * load(base + r * ws.dz_width - kw);
            }
          }
        }
        const int64_t cols = g.width - iw0 < kLanes ? g.width - iw0 : kLanes;
        for (int r = 0; r < rows; ++r) {
          float* dst = grad_image + (ci * g.height + ih0 + r) * g.width + iw0;
          if (cols == kLanes) store(dst, acc[r]);
          else for (int64_t l = 0; l < cols; ++l) dst[l] = acc[r][l];
        }
      }
    }
  }
}

// Adds one image's dL/dweight, lanes still unsummed, to grad_weight_lanes
// ([C_out][C_in][K][K][16]): lanes are 16 conv output columns.
inline void weight_grad_image(const ConvPoolGeometry& g, const Workspace& ws, const float* dz,
                              const float* xp, float* grad_weight_lanes) {
  const int64_t K = g.kernel;
  const int64_t ext_h = g.out_height * g.pool, ext_w = g.out_width * g.pool;
  constexpr int kMaxKernel = 8;
  for (int64_t co = 0; co < g.out_channels; ++co) {
    const float* plane = dz + (co * ws.dz_height + ws.dz_border) * ws.dz_width + ws.dz_border;
    for (int64_t ci = 0; ci < g.in_channels; ++ci) {
      for (int64_t kh = 0; kh < K; ++kh) {
        float* acc_out = grad_weight_lanes + (((co * g.in_channels + ci) * K + kh) * K) * kLanes;
        for (int64_t kw0 = 0; kw0 < K; kw0 += kMaxKernel) {
          const int taps = K - kw0 < kMaxKernel ? int(K - kw0) : kMaxKernel;
          vec acc[kMaxKernel] = {};
          for (int64_t oh = 0; oh < ext_h; ++oh) {
            const float* xrow = xp + (ci * ws.xp_height + oh + kh) * ws.xp_width + kw0;
            for (int64_t ow0 = 0; ow0 < ext_w; ow0 += kLanes) {
              // Columns past ext_w read dz's zero border, so they add nothing.
              const vec d = load(plane + oh * ws.dz_width + ow0);
              for (int t = 0; t < kMaxKernel; ++t)
                if (t < taps) acc[t] += d * load(xrow + ow0 + t);
            }
          }
          for (int t = 0; t < taps; ++t)
            store(acc_out + (kw0 + t) * kLanes, load(acc_out + (kw0 + t) * kLanes) + acc[t]);
        }
      }
    }
  }
}

// Backward of images [n_begin, n_end). grad_weight_lanes ([C_out][C_in][K][K][16])
// and grad_bias_lanes ([channel blocks][16]) accumulate across calls; the
// caller sums their lanes. xp and dz are zeroed buffers of ws.xp_size(g) and
// ws.dz_size(g) floats. weight is the unpacked (C_out, C_in, K, K) weight.
inline void backward_images(const ConvPoolGeometry& g, const float* grad_out, const float* x,
                            const float* packed_weights, const float* packed_bias,
                            const float* weight, float* grad_x, float* grad_weight_lanes,
                            float* grad_bias_lanes, int64_t n_begin, int64_t n_end, float* xp,
                            float* dz) {
  const Workspace ws(g);
  for (int64_t n = n_begin; n < n_end; ++n) {
    load_padded_image(g, ws, x + n * g.in_channels * g.height * g.width, xp);
    const float* grad_image = grad_out + n * g.out_channels * g.out_height * g.out_width;
    switch (g.pool) {
      case 1: dz_pool<1>(g, ws, xp, packed_weights, packed_bias, grad_image, dz, grad_bias_lanes); break;
      case 2: dz_pool<2>(g, ws, xp, packed_weights, packed_bias, grad_image, dz, grad_bias_lanes); break;
      case 3: dz_pool<3>(g, ws, xp, packed_weights, packed_bias, grad_image, dz, grad_bias_lanes); break;
      default: dz_pool<4>(g, ws, xp, packed_weights, packed_bias, grad_image, dz, grad_bias_lanes); break;
    }
    if (grad_x) input_grad_image(g, ws, dz, weight, grad_x + n * g.in_channels * g.height * g.width);
    if (grad_weight_lanes) weight_grad_image(g, ws, dz, xp, grad_weight_lanes);
  }
}

const SimdKernels kernels = {&supported, &xp_size, &dz_size, &forward_images, &backward_images};

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
