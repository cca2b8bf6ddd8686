// The forward in both vector layouts: the conv tiles of conv.h, then the
// sigmoid and the average pool in registers.
#pragma once

#include "conv.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

template <int CB>
inline void column_forward_block(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                                 const PackedWeights& packed, int64_t co0, float* out_image) {
  for_each_column_tile<CB>(g, ws, xp, packed, co0,
                           [&](vec (&acc)[CB][2][2], int64_t ph, int64_t j0, int64_t cols) {
    for (int c = 0; c < CB; ++c) {
      const float b = packed.bias[co0 + c];
      vec sum{};
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) sum += sigmoid_vec(acc[c][dy][dx] + b);
      sum *= 0.25f;
      float* dst = out_image + ((co0 + c) * g.out_height + ph) * g.out_width + j0;
      if (cols == kLanes) store(dst, sum);
      else store_first(dst, sum, cols);
    }
  });
}

// Out of line: inlined into forward_pool's loops, GCC schedules the strip's
// P * P * PW accumulators worse (LeNet's second block about 7% slower).
template <int P, int PW>
__attribute__((noinline)) void forward_strip(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
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

template <int P>
void forward_pool(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                  const PackedWeights& packed, float* out_image) {
  constexpr int PW = StripWidth<P>::value;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    const float* w = packed.block(cb);
    for (int64_t ph = 0; ph < g.out_height; ++ph) {
      for_each_strip<P, PW>(0, g.out_width, [&](auto width, int64_t pw0) {
        forward_strip<P, decltype(width)::value>(g, ws, xp, w, packed.block_bias(cb), cb * kLanes, ph, pw0, out_image);
      });
    }
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
