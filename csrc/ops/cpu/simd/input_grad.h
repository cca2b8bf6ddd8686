// dL/dx in two layouts: lanes over 16 input columns, read from dz planes
// with a zero border (the column-lane path), or lanes over 16 images (the
// channel-lane path), whose dz comes in and grad_x goes out through the
// transposes of transpose.h.
#pragma once

#include "workspace.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

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
        else store_first(dst, acc[r][c], cols);
      }
    }
  }
}

// dL/dx of CB input channels from ci0, two input rows at a time.
template <int CB>
inline void input_grad_channels(const ConvPoolGeometry& g, const Workspace& ws, const float* dz,
                                const float* weight, int64_t ci0, float* grad_image) {
  with_kernel_size(g, [&](auto kernel) {
    constexpr int K = decltype(kernel)::value;
    int64_t ih0 = 0;
    for (; ih0 + 2 <= g.height; ih0 += 2) input_grad_block<2, CB, K>(g, ws, dz, weight, ci0, ih0, grad_image);
    if (ih0 < g.height) input_grad_block<1, CB, K>(g, ws, dz, weight, ci0, ih0, grad_image);
  });
}

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

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
