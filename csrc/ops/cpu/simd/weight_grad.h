// The weight gradient, lanes unsummed until a batch chunk ends: from the
// column-lane dz tile by tile (column_weight_grad_tile, called while dz is in
// registers), or from one image's channel-lane dz.
#pragma once

#include "conv.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

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

// Adds one image's dL/dweight, lanes unsummed, to grad_weight_lanes, from dz
// as channel vectors (the channel-lane path; the column-lane path adds its
// weight gradient while it computes dz).
inline void weight_grad_image(const ConvPoolGeometry& g, const Workspace& ws, const float* dz_lanes,
                              const float* xp, float* grad_weight_lanes) {
  const int64_t K = g.kernel;
  const int64_t ext = g.out_height * g.pool * g.out_width * g.pool;
  for (int64_t cb = 0; cb < ws.channel_blocks; ++cb) {
    for (int64_t ci = 0; ci < g.in_channels; ++ci) {
      for (int64_t kh = 0; kh < K; ++kh) {
        const float* x_rows = xp + (ci * ws.xp_height + kh) * ws.xp_width;
        float* acc_out = grad_weight_lanes + (((cb * g.in_channels + ci) * K + kh) * K) * kLanes;
        for_each_tap_block(K, [&](auto taps, int64_t kw0) {
          weight_grad_channel_taps<decltype(taps)::value>(g, ws, dz_lanes + cb * ext * kLanes, x_rows + kw0,
                                                          acc_out + kw0 * kLanes);
        });
      }
    }
  }
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

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
