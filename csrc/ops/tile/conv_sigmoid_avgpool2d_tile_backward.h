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

// Where dL/dz of channel group `group` at conv position (oh, ow) of one image
// of the tile sits in shared memory: the group's channels are one float4.
LENET_HOST_DEVICE int dz_offset(const ConvTileShape& s, int image, int group, int oh, int ow) {
  return s.dz_at + (((image * channel_groups(s) + group) * s.ext_h + oh) * s.ext_w + ow) * kChannelsPerThread;
}

// Backward phase 1: dL/dz of the tile at every conv output under a pooling
// window (zero for images past the batch and for channels past C_out),
// recomputing z; an item is one pooled output's window for a channel group.
// grad_out holds the gradients of the tile's `images` real images, (image,
// C_out, H_out, W_out), in global or in shared memory.
LENET_HOST_DEVICE void preactivation_grads(const ConvTileShape& s, const float* grad_out, int images, float* smem,
                                           int tid, int threads) {
  const auto per_item = [&](const ChannelGroupItem& item) {
    const auto [image, first, ph, pw] = item;
    const int group = first / kChannelsPerThread;
    const auto dz = [&](int dy, int dx) {
      return smem + dz_offset(s, image, group, ph * s.pool + dy, pw * s.pool + dx);
    };
    float g[kChannelsPerThread] = {};
    if (image >= images) {
      for (int dy = 0; dy < s.pool; ++dy)
        for (int dx = 0; dx < s.pool; ++dx) store4(dz(dy, dx), g);
      return;
    }
    for (int c = 0; c < kChannelsPerThread && first + c < s.out_channels; ++c)
      g[c] = window_mean(s, grad_out[((image * s.out_channels + first + c) * s.out_h + ph) * s.out_w + pw]);
    window_z(s, smem, image, first, ph, pw, [&](int dy, int dx, const float (&z)[kChannelsPerThread]) {
      float value[kChannelsPerThread];
      LENET_UNROLL
      for (int c = 0; c < kChannelsPerThread; ++c) {
        const float a = tile_sigmoid(z[c]);
        // A channel past C_out has zero weights, whose z an infinite x makes
        // NaN: its dL/dz must stay 0, since dL/dx sums over the whole group.
        value[c] = first + c < s.out_channels ? g[c] * a * (1.0f - a) : 0.0f;
      }
      store4(dz(dy, dx), value);
    });
  };
  for_each_channel_group_item<kChannelsPerThread>(s, s.out_h, s.out_w, tid, threads, per_item);
}

// Backward phase 2, part one: one slice of the tile's sums for a channel
// group's weights at one tap (tap < C_in * K * K; its four output channels)
// or, for tap == C_in * K * K, the group's biases, over rows [begin, end) of
// the tile's (image, conv row) pairs. Each input value read feeds the four
// channels. The padding is zeros in shared memory, so no tap needs a bounds
// check.
LENET_HOST_DEVICE void group_parameter_sums(const ConvTileShape& s, const float* smem, int group, int tap, int begin,
                                            int end, float (&sum)[kChannelsPerThread]) {
  const bool is_bias = tap == s.in_channels * s.kernel * s.kernel;
  const int ci = tap / (s.kernel * s.kernel), kh = tap / s.kernel % s.kernel, kw = tap % s.kernel;  // unused for bias
  LENET_UNROLL
  for (int c = 0; c < kChannelsPerThread; ++c) sum[c] = 0.0f;
  for (int row = begin; row < end; ++row) {
    const int image = row / s.ext_h, oh = row % s.ext_h;
    const float* dz = smem + dz_offset(s, image, group, oh, 0);
    float d[kChannelsPerThread];
    if (is_bias) {
      for (int ow = 0; ow < s.ext_w; ++ow) {
        load4(dz + ow * kChannelsPerThread, d);
        LENET_UNROLL
        for (int c = 0; c < kChannelsPerThread; ++c) sum[c] += d[c];
      }
      continue;
    }
    const float* x = smem + s.x_at + ((image * s.in_channels + ci) * s.padded_h + oh + kh) * s.padded_w + kw;
    for (int ow = 0; ow < s.ext_w; ++ow) {
      load4(dz + ow * kChannelsPerThread, d);
      const float value = x[ow];
      LENET_UNROLL
      for (int c = 0; c < kChannelsPerThread; ++c) sum[c] += d[c] * value;
    }
  }
}

// The sums of group_parameter_sums for a channel group's K taps (ci, kh, 0
// .. K - 1) at once (K = kBlockedKernel): along a conv row, x's padded row
// passes through a window of K values in registers, one new value per
// position, and each dL/dz float4 feeds the K taps.
template <int K>
LENET_HOST_DEVICE void group_row_parameter_sums(const ConvTileShape& s, const float* smem, int group, int ci, int kh,
                                                int begin, int end, float (&sum)[K][kChannelsPerThread]) {
  LENET_UNROLL
  for (int kw = 0; kw < K; ++kw) {
    LENET_UNROLL
    for (int c = 0; c < kChannelsPerThread; ++c) sum[kw][c] = 0.0f;
  }
  for (int row = begin; row < end; ++row) {
    const int image = row / s.ext_h, oh = row % s.ext_h;
    const float* dz = smem + dz_offset(s, image, group, oh, 0);
    const float* x = smem + s.x_at + ((image * s.in_channels + ci) * s.padded_h + oh + kh) * s.padded_w;
    float window[K];  // x[ow + kw] for kw < K
    LENET_UNROLL
    for (int kw = 0; kw + 1 < K; ++kw) window[kw + 1] = x[kw];
    for (int ow = 0; ow < s.ext_w; ++ow) {
      LENET_UNROLL
      for (int kw = 0; kw + 1 < K; ++kw) window[kw] = window[kw + 1];
      window[K - 1] = x[ow + K - 1];
      float d[kChannelsPerThread];
      load4(dz + ow * kChannelsPerThread, d);
      LENET_UNROLL
      for (int kw = 0; kw < K; ++kw) {
        LENET_UNROLL
        for (int c = 0; c < kChannelsPerThread; ++c) sum[kw][c] += d[c] * window[kw];
      }
    }
  }
}

// Backward phase 2, part two: dL/dx at (ci, ih, iw) of one image, a gather
// over the conv outputs that read it, a channel group's four at a time.
LENET_HOST_DEVICE float input_grad(const ConvTileShape& s, const float* smem, int image, int ci, int ih, int iw) {
  float sum[kChannelsPerThread] = {};
  for (int group = 0; group < channel_groups(s); ++group) {
    // Tap (kh, kw) of the group's filters over ci is a group's width after tap (kh, kw - 1).
    const float* filter = smem + group_weights_at(s, group * kChannelsPerThread, ci);
    for (int kh = 0; kh < s.kernel; ++kh) {
      const int oh = ih + s.padding - kh;
      if (oh < 0 || oh >= s.ext_h) continue;
      for (int kw = 0; kw < s.kernel; ++kw) {
        const int ow = iw + s.padding - kw;
        if (ow < 0 || ow >= s.ext_w) continue;
        float d[kChannelsPerThread], w[kChannelsPerThread];
        load4(smem + dz_offset(s, image, group, oh, ow), d);
        load4(filter + (kh * s.kernel + kw) * kChannelsPerThread, w);
        LENET_UNROLL
        for (int c = 0; c < kChannelsPerThread; ++c) sum[c] += d[c] * w[c];
      }
    }
  }
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
}

// dL/dx at (ci, ih, iw0 + t) of one image for t < S, kernel size K: the
// same sums as input_grad, ordered so that each value of dL/dz that reaches
// the strip is read once (S + K - 1 of them per channel group and filter
// row) and each tap once, where input_grad reads both per four multiply-adds.
template <int K, int S>
LENET_HOST_DEVICE void input_grad_strip(const ConvTileShape& s, const float* smem, int image, int ci, int ih, int iw0,
                                        float (&out)[S]) {
  LENET_UNROLL
  for (int t = 0; t < S; ++t) out[t] = 0.0f;
  // dL/dz at ow reaches dL/dx at iw = ow - padding + kw: for the strip, ow
  // runs over ow0 + j, j < S + K - 1, and reaches strip entry j - (K - 1) + kw.
  const int ow0 = iw0 + s.padding - (K - 1);
  for (int group = 0; group < channel_groups(s); ++group) {
    const float* filter = smem + group_weights_at(s, group * kChannelsPerThread, ci);
    for (int kh = 0; kh < K; ++kh) {
      const int oh = ih + s.padding - kh;
      if (oh < 0 || oh >= s.ext_h) continue;
      float w[K][kChannelsPerThread];
      LENET_UNROLL
      for (int kw = 0; kw < K; ++kw) load4(filter + (kh * K + kw) * kChannelsPerThread, w[kw]);
      const float* dz_row = smem + dz_offset(s, image, group, oh, 0);
      LENET_UNROLL
      for (int j = 0; j < S + K - 1; ++j) {
        if (ow0 + j < 0 || ow0 + j >= s.ext_w) continue;
        float d[kChannelsPerThread];
        load4(dz_row + (ow0 + j) * kChannelsPerThread, d);
        LENET_UNROLL
        for (int kw = 0; kw < K; ++kw) {
          const int t = j - (K - 1) + kw;
          if (t < 0 || t >= S) continue;
          LENET_UNROLL
          for (int c = 0; c < kChannelsPerThread; ++c) out[t] += d[c] * w[kw][c];
        }
      }
    }
  }
}

// dL/dx values per input-gradient item for kernel size kBlockedKernel:
// LeNet's input widths, 28 and 14, are whole strips.
constexpr int kInputStrip = 7;

// Backward phase 2: the parameter slices first (each is long), then the
// input-gradient items of the tile's `images` real images, into grad_x (the
// tile's first image, in global or shared memory; null when not asked for):
// a strip of kInputStrip values of a row for kernel size kBlockedKernel,
// one value otherwise. With one slice the sums go straight to the tile's row
// of partials (null when neither weight nor bias is asked for), weights
// (C_out, C_in, K, K) first, then the biases.
LENET_HOST_DEVICE void gradients(const ConvTileShape& s, float* smem, float* grad_x, int images, float* partials,
                                 int tid, int threads) {
  const int items = partials ? parameter_group_items(s) : 0;
  const int slice_items = items * s.slices;
  const int taps = s.in_channels * s.kernel * s.kernel, weight_numel = s.out_channels * taps;
  const int rows = s.tile * s.ext_h;
  const bool strips = s.kernel == kBlockedKernel;
  const int row_items = strips ? (s.width + kInputStrip - 1) / kInputStrip : s.width;
  const int inputs = grad_x ? images * s.in_channels * s.height * row_items : 0;
  for (int i = tid; i < slice_items + inputs; i += threads) {
    if (i < slice_items) {
      // Neighbouring threads take neighbouring items of one group: the same dL/dz, neighbouring inputs.
      const int per_group = items / channel_groups(s), taps_per_item = parameter_taps_per_item(s);
      const int slice = i / items, group = i % items / per_group, item = i % items % per_group;
      const int begin = slice * rows / s.slices, end = (slice + 1) * rows / s.slices;
      float* out = s.slices == 1 ? partials : smem + s.slices_at + slice * parameter_count(s);
      // The item's parameters of output channel co at its t-th tap (the bias: t = 0).
      const bool is_bias = item == per_group - 1;
      const auto put = [&](int t, const float (&sum)[kChannelsPerThread]) {
        LENET_UNROLL
        for (int c = 0; c < kChannelsPerThread; ++c) {
          const int co = group * kChannelsPerThread + c;
          if (co < s.out_channels) out[is_bias ? weight_numel + co : co * taps + item * taps_per_item + t] = sum[c];
        }
      };
      if (taps_per_item == kBlockedKernel && !is_bias) {
        float sums[kBlockedKernel][kChannelsPerThread];
        group_row_parameter_sums<kBlockedKernel>(s, smem, group, item / s.kernel, item % s.kernel, begin, end, sums);
        LENET_UNROLL
        for (int t = 0; t < kBlockedKernel; ++t) put(t, sums[t]);
      } else {
        float sum[kChannelsPerThread];
        group_parameter_sums(s, smem, group, is_bias ? taps : item, begin, end, sum);
        put(0, sum);
      }
      continue;
    }
    // The input channel fastest: neighbouring threads read the same dL/dz
    // (one broadcast load) and their own channel's weights.
    const int j = i - slice_items, ci = j % s.in_channels, place = j / s.in_channels % row_items;
    const int ih = j / (s.in_channels * row_items) % s.height, image = j / (s.in_channels * row_items * s.height);
    float* grad_row = grad_x + ((image * s.in_channels + ci) * s.height + ih) * s.width;
    if (!strips) {
      grad_row[place] = input_grad(s, smem, image, ci, ih, place);
      continue;
    }
    const int iw0 = place * kInputStrip;
    float strip[kInputStrip];
    input_grad_strip<kBlockedKernel, kInputStrip>(s, smem, image, ci, ih, iw0, strip);
    LENET_UNROLL
    for (int t = 0; t < kInputStrip; ++t)
      if (iw0 + t < s.width) grad_row[iw0 + t] = strip[t];
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

// The backward program, as the CUDA kernel (../cuda/tile_program.cuh) and the
// CPU emulation (tile_emulation.cpp) run it.
struct ConvTileBackwardProgram {
  using Params = ConvTileBackwardParams;
  static constexpr const char* kName = "ConvTileBackwardProgram";
  static constexpr int kPhases = 4;
  static constexpr const char* kPhaseNames[kPhases] = {"stage", "dL/dz", "gradients", "slices added"};
  // Images per block that choose_tile (../cuda/tile_program.cuh) tries, in order.
  static constexpr int kTileCandidates[] = {8, 4, 2, 1};

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
