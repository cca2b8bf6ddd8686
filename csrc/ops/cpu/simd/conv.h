// The convolution both vector layouts are built on; forward.h and dz.h
// apply the sigmoid and the pool to what these leave in registers.
//  * Lanes over 16 pooled columns (few channels and a 2x2 pool: LeNet's
//    first block fills 14 lanes, where its 6 channels would fill 6). x is
//    split into even and odd columns, so each of the four conv outputs under
//    a pooled output is a plain vector of its own.
//  * Lanes over 16 output channels (LeNet's second block has exactly 16): a
//    whole strip of conv outputs of one channel block stays in registers.
#pragma once

#include "workspace.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

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
                        const PackedWeights& packed, int64_t co0, int64_t ph, int64_t j0,
                        vec (&acc)[CB][2][2]) {
  const int64_t K = KERNEL ? KERNEL : g.kernel;
  const int64_t taps = K * K;
  for (int c = 0; c < CB; ++c)
    for (int dy = 0; dy < 2; ++dy)
      for (int dx = 0; dx < 2; ++dx) acc[c][dy][dx] = vec{};
  // Channel co0 + c's taps for input channel 0, a stride of 16 apart.
  const float* filter[CB];
  for (int c = 0; c < CB; ++c) filter[c] = packed.filter(co0 + c);
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

// Runs tile(acc, ph, j0, cols) for every tile of 16 pooled columns, acc
// holding its z (less the bias) for CB channels from co0.
template <int CB, typename Tile>
inline void for_each_column_tile(const ConvPoolGeometry& g, const Workspace& ws, const float* xp,
                                 const PackedWeights& packed, int64_t co0, Tile&& tile) {
  for (int64_t ph = 0; ph < g.out_height; ++ph) {
    for (int64_t j0 = 0; j0 < g.out_width; j0 += kLanes) {
      vec acc[CB][2][2];
      with_kernel_size(g, [&](auto kernel) {
        column_conv<CB, decltype(kernel)::value>(g, ws, xp, packed, co0, ph, j0, acc);
      });
      tile(acc, ph, j0, g.out_width - j0 < kLanes ? g.out_width - j0 : kLanes);
    }
  }
}

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

// Runs Strip over pooled columns first .. width - 1 of a row in strips of
// PW (a power of 2), then the rest in strips of PW / 2, PW / 4, ..., 1:
// narrow strips have too few accumulators to hide the FMA latency, so as
// few as possible.
template <int P, int PW, typename Strip>
inline void for_each_strip(int64_t first, int64_t width, Strip&& strip) {
  static_assert((PW & (PW - 1)) == 0, "strip widths are powers of 2");
  int64_t pw = first;
  for (; pw + PW <= width; pw += PW) strip(std::integral_constant<int, PW>{}, pw);
  if constexpr (PW > 1) {
    if (pw < width) for_each_strip<P, PW / 2>(pw, width, strip);
  }
}

// Strip widths that keep P * P * PW accumulators within the register file.
template <int P>
struct StripWidth {
  static constexpr int value = P == 1 ? 8 : P == 2 ? 4 : 1;
};

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
