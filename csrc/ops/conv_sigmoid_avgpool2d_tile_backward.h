// The backward phases of the conv operator's tile program (the layout, the
// staging and the conv arithmetic they share with the forward are in
// conv_sigmoid_avgpool2d_tile.h):
//
//   stage | dL/dz | dL/dx, and slices of the weight and bias sums | the slices added
//
// dL/dz stays in shared memory; each tile writes one row of weight and bias
// sums, which tile_partial_sums.h's program adds. The phases take the tile's
// gradients in and out as pointers, so that LeNet's backward program
// (lenet_backward_tile.h) runs them on gradients in shared memory.
#pragma once

#include "conv_sigmoid_avgpool2d_tile.h"

namespace lenet_ext {

namespace conv_tile_phases {

// Backward phase 1: dL/dz of the tile at every conv output under a pooling
// window (zero for images past the batch), recomputing z; an item is one
// pooled output's window. grad_out holds the gradients of the tile's
// `images` real images, (image, C_out, H_out, W_out), in global or in shared
// memory.
LENET_HOST_DEVICE void preactivation_grads(const ConvTileShape& s, const float* grad_out, int images, float* smem,
                                           int tid, int threads) {
  const float window = float(s.pool * s.pool);
  for (int i = tid; i < channel_group_items(s, s.out_h, s.out_w); i += threads) {
    const auto [image, first, ph, pw] = channel_group_item(s, s.out_h, s.out_w, i);
    const int channels = s.out_channels - first < kChannelsPerThread ? s.out_channels - first : kChannelsPerThread;
    float* dz = smem + s.dz_at + ((image * s.out_channels + first) * s.ext_h + ph * s.pool) * s.ext_w + pw * s.pool;
    const int plane = s.ext_h * s.ext_w;
    if (image >= images) {
      for (int c = 0; c < channels; ++c)
        for (int dy = 0; dy < s.pool; ++dy)
          for (int dx = 0; dx < s.pool; ++dx) dz[c * plane + dy * s.ext_w + dx] = 0.0f;
      continue;
    }
    float g[kChannelsPerThread] = {};
    for (int c = 0; c < channels; ++c)
      g[c] = grad_out[((image * s.out_channels + first + c) * s.out_h + ph) * s.out_w + pw] / window;
    window_z(s, smem, image, first, ph, pw, [&](int dy, int dx, const float (&z)[kChannelsPerThread]) {
      for (int c = 0; c < channels; ++c) {
        const float a = sigmoid(z[c]);
        dz[c * plane + dy * s.ext_w + dx] = g[c] * a * (1.0f - a);
      }
    });
  }
}

// Backward phase 2, part one: one slice of the tile's sum for a weight or
// bias element (weights first, then the biases), over rows [begin, end) of
// its (image, conv row) pairs. The padding is zeros in shared memory, so no
// tap needs a bounds check.
LENET_HOST_DEVICE float parameter_sum(const ConvTileShape& s, const float* smem, int element, int begin, int end) {
  const int taps = s.in_channels * s.kernel * s.kernel;
  const int weight_numel = s.out_channels * taps;
  const bool is_bias = element >= weight_numel;
  const int co = is_bias ? element - weight_numel : element / taps;
  const int ci = element / (s.kernel * s.kernel) % s.in_channels;
  const int kh = element / s.kernel % s.kernel, kw = element % s.kernel;
  float sum = 0.0f;
  for (int row = begin; row < end; ++row) {
    const int image = row / s.ext_h, oh = row % s.ext_h;
    const float* dz = smem + s.dz_at + ((image * s.out_channels + co) * s.ext_h + oh) * s.ext_w;
    if (is_bias) {
      for (int ow = 0; ow < s.ext_w; ++ow) sum += dz[ow];
      continue;
    }
    const float* x = smem + s.x_at + ((image * s.in_channels + ci) * s.padded_h + oh + kh) * s.padded_w + kw;
    for (int ow = 0; ow < s.ext_w; ++ow) sum += dz[ow] * x[ow];
  }
  return sum;
}

// Backward phase 2, part two: dL/dx at (ci, ih, iw) of one image, a gather
// over the conv outputs that read it.
LENET_HOST_DEVICE float input_grad(const ConvTileShape& s, const float* smem, int image, int ci, int ih, int iw) {
  float sum = 0.0f;
  for (int co = 0; co < s.out_channels; ++co) {
    const float* dz = smem + s.dz_at + (image * s.out_channels + co) * s.ext_h * s.ext_w;
    // Tap (kh, kw) of channel co's filter over ci is channel_stride floats after tap (kh, kw - 1).
    const float* filter = smem + s.weight_at + ci * s.kernel * s.kernel * s.channel_stride + co;
    for (int kh = 0; kh < s.kernel; ++kh) {
      const int oh = ih + s.padding - kh;
      if (oh < 0 || oh >= s.ext_h) continue;
      for (int kw = 0; kw < s.kernel; ++kw) {
        const int ow = iw + s.padding - kw;
        if (ow >= 0 && ow < s.ext_w) sum += dz[oh * s.ext_w + ow] * filter[(kh * s.kernel + kw) * s.channel_stride];
      }
    }
  }
  return sum;
}

// Backward phase 2: the parameter slices first (each is long), then one item
// per input element of the tile's `images` real images, into grad_x (the
// tile's first image, in global or shared memory; null when not asked for).
// With one slice the sums go straight to the tile's row of partials (null
// when neither weight nor bias is asked for).
LENET_HOST_DEVICE void gradients(const ConvTileShape& s, float* smem, float* grad_x, int images, float* partials,
                                 int tid, int threads) {
  const int parameters = partials ? parameter_count(s) : 0;
  const int slice_items = parameters * s.slices;
  const int rows = s.tile * s.ext_h;
  const int plane = s.height * s.width;
  const int inputs = grad_x ? images * s.in_channels * plane : 0;
  for (int i = tid; i < slice_items + inputs; i += threads) {
    if (i < slice_items) {
      const int slice = i / parameters, element = i % parameters;
      const float sum = parameter_sum(s, smem, element, slice * rows / s.slices, (slice + 1) * rows / s.slices);
      if (s.slices == 1)
        partials[element] = sum;
      else
        smem[s.slices_at + i] = sum;
      continue;
    }
    const int j = i - slice_items;
    const int image = j / (s.in_channels * plane), ci = j / plane % s.in_channels;
    const int ih = j % plane / s.width, iw = j % s.width;
    grad_x[j] = input_grad(s, smem, image, ci, ih, iw);
  }
}

// Backward phase 3: each parameter's slices added in slice order, into the
// tile's row of partials.
LENET_HOST_DEVICE void add_slices(const ConvTileShape& s, const float* smem, float* partials, int tid, int threads) {
  if (!partials || s.slices == 1) return;
  const int parameters = parameter_count(s);
  for (int element = tid; element < parameters; element += threads) {
    float sum = 0.0f;
    for (int slice = 0; slice < s.slices; ++slice) sum += smem[s.slices_at + slice * parameters + element];
    partials[element] = sum;
  }
}

}  // namespace conv_tile_phases

// The backward program, as the CUDA kernel (cuda/tile_program.cuh) and the
// CPU emulation (tile_emulation.cpp) run it.
struct ConvTileBackwardProgram {
  using Params = ConvTileBackwardParams;
  static constexpr int kPhases = 4;

  // One phase for thread tid of `threads`.
  static LENET_HOST_DEVICE void run_phase(int phase, const Params& p, float* smem, int64_t tile_index, int tid,
                                          int threads) {
    using namespace conv_tile_phases;
    const ConvTileShape& s = p.s;
    // The tile's real images (the last tile may be partial) and its rows of the global tensors.
    const int64_t first = tile_index * s.tile;
    const int images = tile_images(p.batch, first, s.tile);
    if (phase == 0)
      stage(s, p.batch, p.x, p.weight, p.bias, smem, tile_index, tid, threads);
    else if (phase == 1)
      preactivation_grads(s, p.grad_out + first * s.out_channels * s.out_h * s.out_w, images, smem, tid, threads);
    else if (phase == 2)
      gradients(s, smem, p.grad_x ? p.grad_x + first * s.in_channels * s.height * s.width : nullptr, images,
                p.partials ? p.partials + tile_index * parameter_count(s) : nullptr, tid, threads);
    else
      add_slices(s, smem, p.partials ? p.partials + tile_index * parameter_count(s) : nullptr, tid, threads);
  }
};

}  // namespace lenet_ext
