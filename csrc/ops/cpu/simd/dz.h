// dL/dz = grad_out / P^2 * s * (1 - s), the gradient behind the pool and
// the sigmoid, recomputed from x in both vector layouts (backward keeps no
// activation).
#pragma once

#include "weight_grad.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

// dL/dz of CB channels from co0, recomputed tile by tile. It goes straight
// into the weight gradient (when grad_weight_lanes is set) and into the dz
// planes only when the input gradient needs them (dz_planes set).
template <int CB>
inline void column_dz_block(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                            const PackedWeights& packed, int64_t co0, const float* grad_image,
                            float* dz_planes, float* grad_weight_lanes, float* grad_bias) {
  vec bias_sum[CB] = {};
  for_each_column_tile<CB>(g, ws, xp, packed, co0,
                           [&](vec (&acc)[CB][2][2], int64_t ph, int64_t j0, int64_t cols) {
    vec d[CB][2][2];
    for (int c = 0; c < CB; ++c) {
      const float b = packed.bias[co0 + c];
      // Lanes past the last column are zero, and so is their dz.
      const vec go = load_first(grad_image + ((co0 + c) * g.out_height + ph) * g.out_width + j0, cols) * 0.25f;
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          const vec z = acc[c][dy][dx] + b;
          d[c][dy][dx] = sigmoid_backward_vec(go, sigmoid_vec(z), z);
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
        const vec z = acc[dy][q * P + dx];
        const vec d = sigmoid_backward_vec(go, sigmoid_vec(z), z);
        grad_bias += d;
        const int64_t oh = ph * P + dy, ow = (pw0 + q) * P + dx;
        const int64_t ext_h = g.out_height * P, ext_w = g.out_width * P;
        store(dz_lanes + (((co0 / kLanes) * ext_h + oh) * ext_w + ow) * kLanes, d);
      }
    }
  }
}

template <int P>
void dz_pool(const ConvPoolGeometry& g, const Workspace& ws, const float* xp, const PackedWeights& packed,
             const float* grad_image, float* dz_lanes, float* grad_bias) {
  constexpr int PW = StripWidth<P>::value;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    const float* w = packed.block(cb);
    vec gb = load(grad_bias + cb * kLanes);
    for (int64_t ph = 0; ph < g.out_height; ++ph)
      for_each_strip<P, PW>(0, g.out_width, [&](auto width, int64_t pw0) {
        dz_strip<P, decltype(width)::value>(g, ws, xp, w, packed.block_bias(cb), cb * kLanes, ph, pw0,
                                            grad_image, dz_lanes, gb);
      });
    store(grad_bias + cb * kLanes, gb);
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
