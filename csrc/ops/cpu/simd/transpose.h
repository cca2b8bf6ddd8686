// 16 x 16 register transposes, and the conversions between channel-lane and
// image-lane data they serve (see input_grad_batch_block).
#pragma once

#include "workspace.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

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

// One image's dz channel vectors as the column-lane path's dz planes,
// [C_out][dz_height][dz_width], with their zero border.
inline void dz_planes_from_lanes(const ConvPoolGeometry& g, const Workspace& ws, const float* dz_lanes,
                                 float* planes) {
  const int64_t ext_h = g.out_height * g.pool, ext_w = g.out_width * g.pool;
  std::memset(planes, 0, g.out_channels * ws.dz_height * ws.dz_width * sizeof(float));
  for (int64_t co = 0; co < g.out_channels; ++co) {
    const float* lanes = dz_lanes + co / kLanes * ext_h * ext_w * kLanes + co % kLanes;
    float* plane = planes + (co * ws.dz_height + ws.dz_border) * ws.dz_width + ws.dz_border;
    for (int64_t oh = 0; oh < ext_h; ++oh)
      for (int64_t ow = 0; ow < ext_w; ++ow) plane[oh * ws.dz_width + ow] = lanes[(oh * ext_w + ow) * kLanes];
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
        else store_first(dst, rows[n], cols);
      }
    }
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
