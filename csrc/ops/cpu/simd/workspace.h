// The per-thread buffers of the vectorised kernels and the padded copies of
// an image they read x from.
#pragma once

#include "vec.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

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
  // [H * W rounded up to 16][16]); see input_grad_batch_block. A group too
  // small to fill those lanes puts one image's dz planes, as the column-lane
  // path keeps them, where the image-lane dz would be.
  int64_t dz_lanes_image_size(const ConvPoolGeometry& g) const {
    return channel_blocks * g.out_height * g.pool * g.out_width * g.pool * kLanes;
  }
  int64_t dz_batch_offset(const ConvPoolGeometry& g) const { return kLanes * dz_lanes_image_size(g); }
  int64_t grad_batch_offset(const ConvPoolGeometry& g) const { return 2 * kLanes * dz_lanes_image_size(g); }
  int64_t grad_batch_plane(const ConvPoolGeometry& g) const { return round16(g.height * g.width); }
  int64_t dz_size(const ConvPoolGeometry& g, bool column_lanes) const {
    const int64_t planes = g.out_channels * dz_height * dz_width;
    if (column_lanes) return planes;
    const int64_t lanes = grad_batch_offset(g) + g.in_channels * grad_batch_plane(g) * kLanes;
    return lanes > dz_batch_offset(g) + planes ? lanes : dz_batch_offset(g) + planes;
  }
};

// Copies image n into xp's interior, all the channel-lane kernels read; the
// zero border was set once.
inline void load_padded_image(const ConvPoolGeometry& g, const Workspace& ws, const float* x_image, float* xp) {
  for (int64_t ci = 0; ci < g.in_channels; ++ci)
    for (int64_t ih = 0; ih < g.height; ++ih)
      copy_floats(xp + (ci * ws.xp_height + ih + g.padding) * ws.xp_width + g.padding,
                  x_image + (ci * g.height + ih) * g.width, g.width);
}

// Whether lanes over pooled columns fill more lanes than lanes over channels.
inline bool use_column_lanes(const ConvPoolGeometry& g) {
  return g.pool == 2 && g.out_width * round16(g.out_channels) > g.out_channels * round16(g.out_width);
}

// Copies image n into xp's even and odd columns, all the column-lane kernels
// read: column iw of x is column iw + padding of xp, whose parity picks the
// half. Each 32 columns of a row are two loads and two shuffles; the halves'
// zero border and slack were set once.
inline void load_split_image(const ConvPoolGeometry& g, const Workspace& ws, const float* x_image, float* xp) {
  static_assert(kLanes == 16, "the shuffles below take 16 lanes");
  const ivec even_lanes = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const ivec odd_lanes = even_lanes + 1;
  const int64_t plane = ws.xp_height * ws.half_width;  // from the even half to the odd one
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    for (int64_t ih = 0; ih < g.height; ++ih) {
      const float* src = x_image + (ci * g.height + ih) * g.width;
      float* row = xp + ws.halves_offset(g) + ((ci * 2) * ws.xp_height + ih + g.padding) * ws.half_width;
      // x's column 2k goes to xp column 2k + padding, 2k + 1 to 2k + 1 + padding.
      float* from_even = row + (g.padding & 1) * plane + (g.padding >> 1);
      float* from_odd = row + (1 - (g.padding & 1)) * plane + ((g.padding + 1) >> 1);
      for (int64_t i = 0; i < g.width; i += 2 * kLanes) {
        const int64_t n = g.width - i < 2 * kLanes ? g.width - i : 2 * kLanes;
        const vec a = load_first(src + i, n < kLanes ? n : kLanes);
        const vec b = n > kLanes ? load_first(src + i + kLanes, n - kLanes) : vec{};
        store_first(from_even + i / 2, __builtin_shuffle(a, b, even_lanes), (n + 1) / 2);
        store_first(from_odd + i / 2, __builtin_shuffle(a, b, odd_lanes), n / 2);
      }
    }
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
