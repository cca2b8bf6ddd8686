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

// Copies image n into xp's interior; the zero border was set once.
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

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
