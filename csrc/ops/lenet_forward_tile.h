// LeNet's whole inference for a tile of images, written as the program of one
// CUDA thread block: phases separated by barriers, each phase a loop of work
// items that the block's threads share out (item = thread, thread + threads,
// ...). Every activation of the tile stays in the block's shared memory; only
// x is read from global memory and only the logits are written to it.
//
// The phases are __host__ __device__ and take the thread's coordinates as
// arguments, so the same code runs in two places:
//   cuda/lenet_cuda.cu            the kernel: one thread block per tile
//   tile_emulation.cpp            the CPU, thread by thread and phase by
//                                 phase, for the tests (see there)
// float32 only; the index math inside a tile is 32-bit.
#pragma once

#include <cstdint>

#include "conv_sigmoid_avgpool2d_tile.h"

namespace lenet_ext {

// Sizes of one call and where each of the tile's buffers sits in shared
// memory (offsets in floats). Computed once on the host by make_tile_shape.
// The conv blocks are two views of the conv operator's tile layout
// (conv_sigmoid_avgpool2d_tile.h) with their buffers at this program's
// offsets: conv1 reads x, conv2 reads block 1's output with conv2's zero
// padding around it, and both stage their weights tap-major.
struct LeNetTileShape {
  ConvTileShape conv1, conv2;
  int f0, f1, f2, f3;                         // dense widths: f0 = c2 * h2 * w2 in, f3 = classes out
  int tile;                                   // images per thread block
  int block2_at, fc1_at, fc2_at;              // per-image buffers, `tile` of each (x, block 1: the views')
  int floats;                                 // shared memory in all
};

struct LeNetTileParams {
  LeNetTileShape s;
  int64_t batch;
  const float* x;
  const float *conv1_w, *conv1_b, *conv2_w, *conv2_b;  // a bias may be null
  const float *fc1_w, *fc1_b, *fc2_w, *fc2_b, *fc3_w, *fc3_b;
  float* logits;
};

// Host side: the layout for these sizes. Block sizes follow the conv
// operator's (stride 1, square kernels, floored pools).
inline LeNetTileShape make_tile_shape(int in_channels, int height, int width, int c1, int k1, int pad1,
                                      int pool1, int c2, int k2, int pad2, int pool2, int f1, int f2,
                                      int f3, int tile) {
  const auto block = [](int channels, int h, int w, int out, int k, int pad, int pool) {
    const int conv_h = h + 2 * pad - k + 1, conv_w = w + 2 * pad - k + 1;
    return ConvPoolGeometry{0, channels, h, w, out, k, pad, pool, conv_h, conv_w, conv_h / pool, conv_w / pool};
  };
  const ConvPoolGeometry g1 = block(in_channels, height, width, c1, k1, pad1, pool1);
  const ConvPoolGeometry g2 = block(c1, int(g1.out_height), int(g1.out_width), c2, k2, pad2, pool2);
  LeNetTileShape s{};
  s.conv1 = make_conv_tile_shape(g1, tile, 0);
  s.conv2 = make_conv_tile_shape(g2, tile, 0);
  s.f0 = c2 * s.conv2.out_h * s.conv2.out_w, s.f1 = f1, s.f2 = f2, s.f3 = f3;
  s.tile = tile;
  int at = 0;
  const auto take = [&](int floats) {
    const int start = at;
    at += floats;
    return start;
  };
  // The weights first: whole groups of 4 floats, so every weight row is 16-byte aligned.
  for (ConvTileShape* conv : {&s.conv1, &s.conv2}) {
    conv->weight_at = take(conv->in_channels * conv->kernel * conv->kernel * conv->channel_stride);
    conv->bias_at = take(conv->channel_stride);
  }
  s.conv1.x_at = take(tile * in_channels * s.conv1.padded_h * s.conv1.padded_w);
  s.conv2.x_at = take(tile * c1 * s.conv2.padded_h * s.conv2.padded_w);
  s.block2_at = take(tile * s.f0);
  s.fc1_at = take(tile * f1), s.fc2_at = take(tile * f2);
  s.floats = s.conv1.floats = s.conv2.floats = at;
  return s;
}

// The same sizes with another number of images per block.
inline LeNetTileShape retile(const LeNetTileShape& s, int tile) {
  const ConvTileShape &a = s.conv1, &b = s.conv2;
  return make_tile_shape(a.in_channels, a.height, a.width, a.out_channels, a.kernel, a.padding, a.pool,
                         b.out_channels, b.kernel, b.padding, b.pool, s.f1, s.f2, s.f3, tile);
}

constexpr int kLeNetTilePhases = 6;

namespace tile_phases {

// Phase 0: both conv blocks' weights and biases, and the tile's images with
// their zero padding; block 1's padded buffer is zeroed (phase 1 fills its interior).
LENET_HOST_DEVICE void stage(const LeNetTileParams& p, float* smem, int64_t tile_index, int tid, int threads) {
  const LeNetTileShape& s = p.s;
  conv_tile_phases::stage_weights(s.conv1, p.conv1_w, p.conv1_b, smem, tid, threads);
  conv_tile_phases::stage_weights(s.conv2, p.conv2_w, p.conv2_b, smem, tid, threads);
  conv_tile_phases::stage_images(s.conv1, p.batch, p.x, smem, tile_index, tid, threads);
  const ConvTileShape& b1 = s.conv2;  // block 1's output, as conv2 reads it
  for (int i = tid; i < s.tile * b1.in_channels * b1.padded_h * b1.padded_w; i += threads) smem[b1.x_at + i] = 0.0f;
}

// Phase 1: conv block 1 into the interior of its padded buffer, a channel
// group of one pooled output per item.
LENET_HOST_DEVICE void conv_block1(const LeNetTileParams& p, float* smem, int tid, int threads) {
  const ConvTileShape &c1 = p.s.conv1, &b1 = p.s.conv2;
  for (int i = tid; i < conv_tile_phases::channel_group_items(c1, c1.out_h, c1.out_w); i += threads) {
    const auto [image, first, ph, pw] = conv_tile_phases::channel_group_item(c1, c1.out_h, c1.out_w, i);
    float out[kChannelsPerThread];
    conv_tile_phases::pooled_group(c1, smem, image, first, ph, pw, out);
    for (int c = 0; c < kChannelsPerThread && first + c < c1.out_channels; ++c)
      smem[b1.x_at + ((image * b1.in_channels + first + c) * b1.padded_h + ph + b1.padding) * b1.padded_w + pw +
           b1.padding] = out[c];
  }
}

// Phase 2: conv block 2, flattened as nn.Flatten orders it (c, h, w).
LENET_HOST_DEVICE void conv_block2(const LeNetTileParams& p, float* smem, int tid, int threads) {
  const LeNetTileShape& s = p.s;
  const ConvTileShape& c2 = s.conv2;
  for (int i = tid; i < conv_tile_phases::channel_group_items(c2, c2.out_h, c2.out_w); i += threads) {
    const auto [image, first, ph, pw] = conv_tile_phases::channel_group_item(c2, c2.out_h, c2.out_w, i);
    float out[kChannelsPerThread];
    conv_tile_phases::pooled_group(c2, smem, image, first, ph, pw, out);
    for (int c = 0; c < kChannelsPerThread && first + c < c2.out_channels; ++c)
      smem[s.block2_at + image * s.f0 + ((first + c) * c2.out_h + ph) * c2.out_w + pw] = out[c];
  }
}

// A dense layer over the tile: out[image][j] = in[image] . W[j] + b[j], then
// the sigmoid unless this is the last layer.
LENET_HOST_DEVICE void dense(const float* in, int in_features, const float* weight, const float* bias, int out_features,
                             int tile, bool apply_sigmoid, float* out, int tid, int threads) {
  for (int i = tid; i < tile * out_features; i += threads) {
    const int image = i / out_features, j = i % out_features;
    const float* row = weight + static_cast<int64_t>(j) * in_features;
    float z = bias ? bias[j] : 0.0f;
    for (int k = 0; k < in_features; ++k) z += in[image * in_features + k] * row[k];
    out[i] = apply_sigmoid ? sigmoid(z) : z;
  }
}

}  // namespace tile_phases

// Runs one phase of the tile program for thread tid of `threads`.
LENET_HOST_DEVICE void lenet_tile_phase(int phase, const LeNetTileParams& p, float* smem, int64_t tile_index, int tid,
                                        int threads) {
  using namespace tile_phases;
  const LeNetTileShape& s = p.s;
  switch (phase) {
    case 0: stage(p, smem, tile_index, tid, threads); break;
    case 1: conv_block1(p, smem, tid, threads); break;
    case 2: conv_block2(p, smem, tid, threads); break;
    case 3: dense(smem + s.block2_at, s.f0, p.fc1_w, p.fc1_b, s.f1, s.tile, true, smem + s.fc1_at, tid, threads); break;
    case 4: dense(smem + s.fc1_at, s.f1, p.fc2_w, p.fc2_b, s.f2, s.tile, true, smem + s.fc2_at, tid, threads); break;
    default: {
      // The logits of the tile's real images (the last tile may be partial).
      const int64_t first = tile_index * s.tile;
      const int images = p.batch - first < s.tile ? static_cast<int>(p.batch - first) : s.tile;
      dense(smem + s.fc2_at, s.f2, p.fc3_w, p.fc3_b, s.f3, images, false, p.logits + first * s.f3, tid, threads);
    }
  }
}

}  // namespace lenet_ext
