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

#include "conv_sigmoid_avgpool2d_math.h"

namespace lenet_ext {

// Sizes of one call and where each of the tile's buffers sits in shared
// memory (offsets in floats). Computed once on the host by make_tile_shape.
struct LeNetTileShape {
  int in_channels, height, width;             // x
  int c1, k1, pad1, pool1, h1, w1;            // conv block 1: its pooled output is c1 x h1 x w1
  int c2, k2, pad2, pool2, h2, w2;            // conv block 2
  int f0, f1, f2, f3;                         // dense widths: f0 = c2 * h2 * w2 in, f3 = classes out
  int tile;                                   // images per thread block
  int xp_h, xp_w, b1p_h, b1p_w;               // x and block 1's output with their zero padding
  int w1_at, b1_at, w2_at, b2_at;             // conv weights and biases, staged once per block
  int x_at, block1_at, block2_at, fc1_at, fc2_at;  // per-image buffers, `tile` of each
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
  LeNetTileShape s{};
  s.in_channels = in_channels, s.height = height, s.width = width;
  s.c1 = c1, s.k1 = k1, s.pad1 = pad1, s.pool1 = pool1;
  s.h1 = (height + 2 * pad1 - k1 + 1) / pool1, s.w1 = (width + 2 * pad1 - k1 + 1) / pool1;
  s.c2 = c2, s.k2 = k2, s.pad2 = pad2, s.pool2 = pool2;
  s.h2 = (s.h1 + 2 * pad2 - k2 + 1) / pool2, s.w2 = (s.w1 + 2 * pad2 - k2 + 1) / pool2;
  s.f0 = c2 * s.h2 * s.w2, s.f1 = f1, s.f2 = f2, s.f3 = f3;
  s.tile = tile;
  s.xp_h = height + 2 * pad1, s.xp_w = width + 2 * pad1;
  s.b1p_h = s.h1 + 2 * pad2, s.b1p_w = s.w1 + 2 * pad2;
  int at = 0;
  const auto take = [&](int floats) {
    const int start = at;
    at += floats;
    return start;
  };
  s.w1_at = take(c1 * in_channels * k1 * k1), s.b1_at = take(c1);
  s.w2_at = take(c2 * c1 * k2 * k2), s.b2_at = take(c2);
  s.x_at = take(tile * in_channels * s.xp_h * s.xp_w);
  s.block1_at = take(tile * c1 * s.b1p_h * s.b1p_w);
  s.block2_at = take(tile * s.f0);
  s.fc1_at = take(tile * f1), s.fc2_at = take(tile * f2);
  s.floats = at;
  return s;
}

// The same sizes with another number of images per block.
inline LeNetTileShape retile(const LeNetTileShape& s, int tile) {
  return make_tile_shape(s.in_channels, s.height, s.width, s.c1, s.k1, s.pad1, s.pool1, s.c2, s.k2, s.pad2, s.pool2,
                         s.f1, s.f2, s.f3, tile);
}

constexpr int kLeNetTilePhases = 6;

namespace tile_phases {

// Phase 0: the conv weights and biases, and the tile's images with their
// zero padding; block 1's padded buffer is zeroed (phase 1 fills its interior).
LENET_HOST_DEVICE void stage(const LeNetTileParams& p, float* smem, int64_t tile_index, int tid, int threads) {
  const LeNetTileShape& s = p.s;
  const int w1_size = s.c1 * s.in_channels * s.k1 * s.k1, w2_size = s.c2 * s.c1 * s.k2 * s.k2;
  for (int i = tid; i < w1_size; i += threads) smem[s.w1_at + i] = p.conv1_w[i];
  for (int i = tid; i < s.c1; i += threads) smem[s.b1_at + i] = p.conv1_b ? p.conv1_b[i] : 0.0f;
  for (int i = tid; i < w2_size; i += threads) smem[s.w2_at + i] = p.conv2_w[i];
  for (int i = tid; i < s.c2; i += threads) smem[s.b2_at + i] = p.conv2_b ? p.conv2_b[i] : 0.0f;
  const int plane = s.xp_h * s.xp_w;
  for (int i = tid; i < s.tile * s.in_channels * plane; i += threads) {
    const int image = i / (s.in_channels * plane), ci = i / plane % s.in_channels;
    const int y = i % plane / s.xp_w - s.pad1, x = i % s.xp_w - s.pad1;
    const int64_t n = tile_index * s.tile + image;
    const bool inside = n < p.batch && y >= 0 && y < s.height && x >= 0 && x < s.width;
    smem[s.x_at + i] = inside ? p.x[((n * s.in_channels + ci) * s.height + y) * s.width + x] : 0.0f;
  }
  for (int i = tid; i < s.tile * s.c1 * s.b1p_h * s.b1p_w; i += threads) smem[s.block1_at + i] = 0.0f;
}

// One pooled output of a conv block: the mean over its pool x pool window of
// sigmoid(conv), from an input already padded (in: channels x in_h x in_w).
LENET_HOST_DEVICE float pooled(const float* in, int channels, int in_h, int in_w, const float* filter, float bias,
                               int k, int pool, int ph, int pw) {
  float sum = 0.0f;
  for (int dy = 0; dy < pool; ++dy) {
    for (int dx = 0; dx < pool; ++dx) {
      float z = bias;
      for (int ci = 0; ci < channels; ++ci)
        for (int kh = 0; kh < k; ++kh)
          for (int kw = 0; kw < k; ++kw)
            z += in[(ci * in_h + ph * pool + dy + kh) * in_w + pw * pool + dx + kw] * filter[(ci * k + kh) * k + kw];
      sum += sigmoid(z);
    }
  }
  return sum / float(pool * pool);
}

// Phase 1: conv block 1 into the interior of its padded buffer.
LENET_HOST_DEVICE void conv_block1(const LeNetTileParams& p, float* smem, int tid, int threads) {
  const LeNetTileShape& s = p.s;
  const int per_image = s.c1 * s.h1 * s.w1;
  for (int i = tid; i < s.tile * per_image; i += threads) {
    const int image = i / per_image, c = i / (s.h1 * s.w1) % s.c1, ph = i / s.w1 % s.h1, pw = i % s.w1;
    const float value = pooled(smem + s.x_at + image * s.in_channels * s.xp_h * s.xp_w, s.in_channels, s.xp_h,
                               s.xp_w, smem + s.w1_at + c * s.in_channels * s.k1 * s.k1, smem[s.b1_at + c], s.k1,
                               s.pool1, ph, pw);  // fmt: skip
    smem[s.block1_at + ((image * s.c1 + c) * s.b1p_h + ph + s.pad2) * s.b1p_w + pw + s.pad2] = value;
  }
}

// Phase 2: conv block 2, flattened as nn.Flatten orders it (c, h, w).
LENET_HOST_DEVICE void conv_block2(const LeNetTileParams& p, float* smem, int tid, int threads) {
  const LeNetTileShape& s = p.s;
  for (int i = tid; i < s.tile * s.f0; i += threads) {
    const int image = i / s.f0, c = i / (s.h2 * s.w2) % s.c2, ph = i / s.w2 % s.h2, pw = i % s.w2;
    smem[s.block2_at + i] = pooled(smem + s.block1_at + image * s.c1 * s.b1p_h * s.b1p_w, s.c1, s.b1p_h, s.b1p_w,
                                   smem + s.w2_at + c * s.c1 * s.k2 * s.k2, smem[s.b2_at + c], s.k2, s.pool2, ph, pw);
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
