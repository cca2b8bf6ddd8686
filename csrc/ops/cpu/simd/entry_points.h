// The entry points of the vectorised float32 kernels (the SimdKernels table
// of simd_kernels.h), for the instruction set this build compiles them for.
//
// Vector layouts, each where it fills the lanes best:
//  * forward and dz, many channels: lanes are 16 output channels. LeNet's
//    second block has exactly 16, and a whole strip of conv outputs of one
//    channel block stays in registers through the sigmoid and the pooling.
//  * forward and dz, few channels and a 2x2 pool: lanes are 16 pooled
//    columns (LeNet's first block fills 14 of them, where its 6 channels
//    would fill 6).
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
// The scalar reference of the same math is ../../conv_sigmoid_avgpool2d_math.h,
// which the CUDA kernels and the generic CPU path run.
#pragma once

#include "dense.h"
#include "dz.h"
#include "forward.h"
#include "input_grad.h"
#include "transpose.h"
#include "weight_grad.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

// Pools the kernels are specialised for; others take the generic path.
inline bool supported(const ConvPoolGeometry& g) { return g.pool >= 1 && g.pool <= 4; }

inline int64_t xp_size(const ConvPoolGeometry& g) { return Workspace(g).xp_size(g); }
inline int64_t dz_size(const ConvPoolGeometry& g) { return Workspace(g).dz_size(g, use_column_lanes(g)); }
// The floats of sum_weight_lanes' layouts, which every backward call zeroes:
// with column lanes 16 per weight; with channel lanes one per weight, C_out
// rounded up to whole vectors.
inline int64_t weight_lanes_size(const ConvPoolGeometry& g) {
  const int64_t per_channel = g.in_channels * g.kernel * g.kernel;
  return use_column_lanes(g) ? g.out_channels * per_channel * kLanes : round16(g.out_channels) * per_channel;
}

// Calls f(std::integral_constant<int, P>{}) for the pool size P of g.
template <typename F>
inline void with_pool_size(const ConvPoolGeometry& g, F&& f) {
  switch (g.pool) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

inline void forward_images(const ConvPoolGeometry& g, const ForwardImages& call, int64_t n_begin,
                           int64_t n_end) {
  const Workspace ws(g);
  float* xp = call.xp;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* x_image = call.x + n * g.in_channels * g.height * g.width;
    float* out_image = call.out + n * g.out_channels * g.out_height * g.out_width;
    if (use_column_lanes(g)) {
      load_split_image(g, ws, x_image, xp);
      for_each_channel_block(g.out_channels, [&](auto channels, int64_t co0) {
        column_forward_block<decltype(channels)::value>(g, ws, xp, call.packed, co0, out_image);
      });
      continue;
    }
    load_padded_image(g, ws, x_image, xp);
    with_pool_size(g, [&](auto pool) {
      forward_pool<decltype(pool)::value>(g, ws, xp, call.packed, out_image);
    });
  }
}

inline void backward_images(const ConvPoolGeometry& g, const BackwardImages& call, int64_t n_begin,
                            int64_t n_end) {
  const Workspace ws(g);
  const int64_t image_numel = g.in_channels * g.height * g.width;
  float* xp = call.xp;
  float* dz = call.dz;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* x_image = call.x + n * image_numel;
    const float* grad_image = call.grad_out + n * g.out_channels * g.out_height * g.out_width;
    if (use_column_lanes(g)) {
      load_split_image(g, ws, x_image, xp);
      for_each_channel_block(g.out_channels, [&](auto channels, int64_t co0) {
        column_dz_block<decltype(channels)::value>(g, ws, xp, call.packed, co0, grad_image,
                                                   call.grad_x ? dz : nullptr, call.grad_weight_lanes,
                                                   call.grad_bias_lanes);
      });
      if (call.grad_x) {
        float* grad_image_x = call.grad_x + n * image_numel;
        for_each_channel_block(g.in_channels, [&](auto channels, int64_t ci0) {
          input_grad_channels<decltype(channels)::value>(g, ws, dz, call.weight, ci0, grad_image_x);
        });
      }
      continue;
    }
    load_padded_image(g, ws, x_image, xp);
    // The image's slot in its group of 16, whose input gradients are
    // computed together once the group is complete.
    const int64_t slot = (n - n_begin) % kLanes;
    float* dz_lanes = dz + slot * ws.dz_lanes_image_size(g);
    with_pool_size(g, [&](auto pool) {
      dz_pool<decltype(pool)::value>(g, ws, xp, call.packed, grad_image, dz_lanes, call.grad_bias_lanes);
    });
    if (call.grad_weight_lanes) weight_grad_image(g, ws, dz_lanes, xp, call.grad_weight_lanes);
    if (!call.grad_x || (slot < kLanes - 1 && n < n_end - 1)) continue;  // the group is not complete yet
    const int64_t group = slot + 1;
    float* dz_batch = dz + ws.dz_batch_offset(g);
    if (group < kLanes / 2) {
      // Too few images to fill lanes over images: each alone, lanes over its
      // columns, its dz planes where the image-lane dz would be.
      for (int64_t i = 0; i < group; ++i) {
        dz_planes_from_lanes(g, ws, dz + i * ws.dz_lanes_image_size(g), dz_batch);
        for_each_channel_block(g.in_channels, [&](auto channels, int64_t ci0) {
          input_grad_channels<decltype(channels)::value>(g, ws, dz_batch, call.weight, ci0,
                                                         call.grad_x + (n - slot + i) * image_numel);
        });
      }
      continue;
    }
    float* grad_batch = dz + ws.grad_batch_offset(g);
    dz_batch_from_lanes(g, ws, dz, group, dz_batch);
    for_each_channel_block(g.in_channels, [&](auto channels, int64_t ci0) {
      with_kernel_size(g, [&](auto kernel) {
        input_grad_batch_block<decltype(channels)::value, decltype(kernel)::value>(g, ws, dz_batch, call.weight, ci0,
                                                                                   grad_batch);
      });
    });
    grad_x_from_batch(g, ws, grad_batch, group, call.grad_x + (n - slot) * image_numel);
  }
}

const SimdKernels kernels = {&supported,       &xp_size,          &dz_size,          &weight_lanes_size,
                             &forward_images,  &backward_images,  &sum_weight_lanes, &dense_rows,
                             &dense_backward_rows};

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
