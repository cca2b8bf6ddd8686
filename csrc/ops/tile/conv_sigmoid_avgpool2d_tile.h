// The conv -> sigmoid -> avgpool operator's fast CUDA kernels, forward and
// backward, written as the programs of one thread block for a tile of images:
// phases separated by barriers, each phase a loop of work items that the
// block's threads share out (item = thread, thread + threads, ...).
//
//   forward   stage | pooled outputs
//   backward  stage | dL/dz | dL/dx, and slices of the weight and bias sums
//             | the slices added: this tile's sums
//
// The weights and the tile's images (with their zero padding) sit in shared
// memory, so the conv reads no global memory and needs no bounds checks; a
// thread computes kChannelsPerThread output channels at one position, so
// every input value it loads feeds that many multiply-adds. The backward
// keeps dL/dz in shared memory too, a channel group's four values side by
// side, so that its weight and input gradients also take four channels per
// load: one launch per conv block. For LeNet's kernel size the gradient
// loops are blocked in registers besides: a weight item takes a filter row's
// five taps, an input-gradient item a strip of seven values of a row. A
// parameter item (a channel group's weights at one tap or one filter row,
// or its biases) sums over the tile in slices of its rows when there are
// too few items to keep every thread busy (LeNet's first block has 12); the
// slices are added in a fixed order, and each tile
// writes its own row of sums, which the program of tile_partial_sums.h adds
// in a fixed order too: the gradients are bitwise repeatable.
//
// Like lenet_forward_tile.h, the phases are __host__ __device__ over the
// thread's coordinates: ../cuda/conv_sigmoid_avgpool2d_cuda.cu launches them, and
// tile_emulation.cpp runs them on the CPU thread by thread for the tests.
// This file: the layout, the staging, the conv arithmetic and the forward;
// conv_sigmoid_avgpool2d_tile_backward.h: the backward's phases.
// float32 only; index math inside a tile is 32-bit, offsets into the batch
// 64-bit.
#pragma once

#include <cstdint>

#include "../conv_sigmoid_avgpool2d_math.h"
#include "tile_common.h"

namespace lenet_ext {

constexpr int kChannelsPerThread = 4;
static_assert(kChannelsPerThread == 4, "a channel group's weights of one tap are one float4");

// Sizes of one call and where each buffer sits in shared memory (in floats).
struct ConvTileShape {
  int in_channels, height, width, out_channels, kernel, padding, pool;
  int out_h, out_w;        // pooled output
  int ext_h, ext_w;        // conv outputs under a pooling window
  int padded_h, padded_w;  // x with its zero padding
  int tile;                // images per thread block
  int channel_stride;      // C_out rounded up to whole channel groups
  int group_width;         // channels per group of the weights' layout: the items' G (group_weights_at)
  int slices;              // backward: parts of the tile's (image, conv row) rows per parameter sum
  float inverse_window;    // 1 / (pool * pool) when that is a power of two, else 0 (window_mean)
  // dz (backward): dL/dz as (image, channel group, ext_h, ext_w, kChannelsPerThread), so
  // that a group's four channels at one position are one 16-byte load, zero past C_out.
  int weight_at, bias_at, x_at, dz_at, slices_at;  // the last two: backward only
  int floats;                                      // shared memory in all
};

// The channel groups of G channels each (the backward's are kChannelsPerThread
// wide; a forward may take wider ones, channel_stride permitting).
template <int G = kChannelsPerThread>
LENET_HOST_DEVICE int channel_groups(const ConvTileShape& s) {
  return s.channel_stride / G;
}

// G floats at p, a channel group's weights of one tap or its biases, as
// vector loads: G / 4 of four floats when G is a multiple of four (p
// 16-byte aligned), else G / 2 of two (p 8-byte aligned).
template <int G>
LENET_HOST_DEVICE void load_group(const float* p, float (&out)[G]) {
  static_assert(G % 2 == 0, "a channel group is whole float2s");
  constexpr int kWidth = G % 4 == 0 ? 4 : 2;
  LENET_UNROLL
  for (int q = 0; q < G / kWidth; ++q) {
    float v[kWidth];
    if constexpr (kWidth == 4)
      load4(p + 4 * q, v);
    else
      load2(p + 2 * q, v);
    LENET_UNROLL
    for (int c = 0; c < kWidth; ++c) out[kWidth * q + c] = v[c];
  }
}

// The weights in shared memory, a channel group after another, each group's
// [C_in * K * K][group_width]: a group's weights of one tap are one or two
// vector loads (load_group), and its next tap's lie group_width floats on,
// a step the items know at compile time. The offset of the weights of input
// channel ci for the group whose first channel is `first`.
LENET_HOST_DEVICE int group_weights_at(const ConvTileShape& s, int first, int ci) {
  const int taps = s.kernel * s.kernel;
  return s.weight_at + (first * s.in_channels + ci * s.group_width) * taps;
}

// value / (pool * pool): the mean of a pooling window's sum, and its share of
// the pooled output's gradient. When pool * pool is a power of two (LeNet's
// 4) a multiplication by its exact inverse, which rounds as the division
// does, without the division's dozen instructions and slow-path branch.
LENET_HOST_DEVICE float window_mean(const ConvTileShape& s, float value) {
  return s.inverse_window != 0.0f ? value * s.inverse_window : value / float(s.pool * s.pool);
}

// Weights and biases: the length of a tile's row of sums.
LENET_HOST_DEVICE int parameter_count(const ConvTileShape& s) {
  return s.out_channels * (s.in_channels * s.kernel * s.kernel + 1);
}

// The kernel size (LeNet's) whose backward loops are blocked in registers:
// a weight item takes a filter row's taps, an input-gradient item a strip of
// a row (conv_sigmoid_avgpool2d_tile_backward.h).
constexpr int kBlockedKernel = 5;

// The backward's parameter work items: per channel group, one for the
// biases and, for kernel size kBlockedKernel, one per filter row (ci, kh),
// its taps together; other sizes one per tap. An item sums
// kChannelsPerThread parameters at each of its taps.
LENET_HOST_DEVICE int parameter_taps_per_item(const ConvTileShape& s) {
  return s.kernel == kBlockedKernel ? s.kernel : 1;
}
LENET_HOST_DEVICE int parameter_group_items(const ConvTileShape& s) {
  return channel_groups(s) * (s.in_channels * s.kernel * s.kernel / parameter_taps_per_item(s) + 1);
}

// Whether x's rows are whole quads of four floats with an even padding
// (LeNet's 28 columns, padded by 2): their padded rows are then whole quads
// too, and with the interior of each on a 16-byte boundary (place_images),
// stage_images copies them a quad at a time.
LENET_HOST_DEVICE bool rows_of_quads(const ConvTileShape& s) { return s.width % 4 == 0 && s.padding % 2 == 0; }

// Where a tile's images go in shared memory, from offset `at` on: x_at, and
// `end`, the first offset past them. Rows of quads start their interior on a
// 16-byte boundary, with a quad's room on each side of the buffer for the
// padding that its first and last quads straddle; other sizes start at `at`.
struct ImagesPlace {
  int x_at, end;
};
inline ImagesPlace place_images(const ConvTileShape& s, int at) {
  const int floats = s.tile * s.in_channels * s.padded_h * s.padded_w;
  if (!rows_of_quads(s)) return {at, at + floats};
  const int lead = (4 - s.padding % 4) % 4;  // padding cells before a row's interior in its quad
  const int start = (at + 3) / 4 * 4;
  return {start + lead, start + floats + (lead > 0 ? 4 : 0)};
}

// Whether stage_images copies the images in quads: rows placed by
// place_images, from an x whose rows are whole 16-byte aligned quads.
LENET_HOST_DEVICE bool rows_in_quads(const ConvTileShape& s, const float* x) {
  return rows_of_quads(s) && (s.x_at + s.padding) % 4 == 0 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
}

// The layout for `tile` images per block; `threads` is the block size, which
// the backward's slice count is chosen for (0 for the forward). A forward
// whose items take `channels_per_item` channels (an even number; the
// backward's are kChannelsPerThread) stages its weights' rows in whole groups
// of that many.
inline ConvTileShape make_conv_tile_shape(const ConvPoolGeometry& g, int tile, int backward_threads,
                                          int channels_per_item = kChannelsPerThread) {
  ConvTileShape s{};
  s.in_channels = int(g.in_channels), s.height = int(g.height), s.width = int(g.width);
  s.out_channels = int(g.out_channels), s.kernel = int(g.kernel), s.padding = int(g.padding), s.pool = int(g.pool);
  s.out_h = int(g.out_height), s.out_w = int(g.out_width);
  s.ext_h = s.out_h * s.pool, s.ext_w = s.out_w * s.pool;
  s.padded_h = s.height + 2 * s.padding, s.padded_w = s.width + 2 * s.padding;
  s.tile = tile;
  s.channel_stride = (s.out_channels + channels_per_item - 1) / channels_per_item * channels_per_item;
  s.group_width = channels_per_item;
  const int window = s.pool * s.pool;
  s.inverse_window = (window & (window - 1)) == 0 ? 1.0f / float(window) : 0.0f;
  const int items = parameter_group_items(s), tap_items = items * parameter_taps_per_item(s);
  const int rows = tile * s.ext_h;
  // About two taps' sums per thread and at least an item per thread, while
  // the slices' sums take at most half the shared memory of dL/dz; never an
  // empty slice.
  const int for_taps = (2 * backward_threads + tap_items - 1) / tap_items;
  const int for_threads = (backward_threads + items - 1) / items;
  const int memory_cap = tile * s.channel_stride * s.ext_h * s.ext_w / (2 * parameter_count(s));
  int wanted = for_taps > for_threads ? for_taps : for_threads;
  wanted = wanted > memory_cap ? memory_cap : wanted;
  s.slices = wanted < 1 ? 1 : wanted > rows ? rows : wanted;
  int at = 0;
  const auto take = [&](int floats) {
    const int start = at;
    at += floats;
    return start;
  };
  // First, so that a channel group's weights start on a 16-byte boundary.
  s.weight_at = take(s.in_channels * s.kernel * s.kernel * s.channel_stride);
  s.bias_at = take(s.channel_stride);
  const ImagesPlace images = place_images(s, at);
  s.x_at = images.x_at, at = images.end;
  const bool backward = backward_threads > 0;
  if (backward) at = (at + kChannelsPerThread - 1) / kChannelsPerThread * kChannelsPerThread;  // dz on 16 bytes
  s.dz_at = backward ? take(tile * s.channel_stride * s.ext_h * s.ext_w) : at;
  s.slices_at = backward && s.slices > 1 ? take(s.slices * parameter_count(s)) : at;
  s.floats = at;
  return s;
}

// Whether the sizes of a call keep every offset inside a tile of one image
// (and the weights) within 32 bits; shared memory then bounds the rest.
inline bool conv_tile_indices_fit(const ConvPoolGeometry& g) {
  const int64_t limit = int64_t(1) << 24;
  return g.in_channels * (g.height + 2 * g.padding) * (g.width + 2 * g.padding) < limit &&
         g.out_channels * g.in_channels * g.kernel * g.kernel < limit &&
         g.out_channels * g.out_height * g.pool * g.out_width * g.pool < limit;
}

struct ConvTileForwardParams {
  ConvTileShape s;
  int64_t batch;
  const float *x, *weight, *bias;  // bias may be null
  float* out;
};

struct ConvTileBackwardParams {
  ConvTileShape s;
  int64_t batch;
  const float *grad_out, *x, *weight, *bias;  // bias may be null
  float* grad_x;                              // null when dL/dx is not asked for
  float* partials;  // (tiles, weight numel + C_out), weight first; null when neither is asked for
};

namespace conv_tile_phases {

// The weights and biases (0 without one) of a conv block, the weights in
// group_weights_at's layout, zero past C_out. Four loads in flight per
// thread on the GPU, as for the images.
LENET_HOST_DEVICE void stage_weights(const ConvTileShape& s, const float* weight, const float* bias, float* smem,
                                     int tid, int threads) {
  const int taps = s.in_channels * s.kernel * s.kernel;
  IndexWalk<3> at(tid, threads, {0, taps, s.group_width});  // (group, tap, channel of the group)
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
  for (int i = tid; i < taps * s.channel_stride; i += threads, at.advance()) {
    const int tap = at.coord[1], co = at.coord[0] * s.group_width + at.coord[2];
    smem[s.weight_at + i] = co < s.out_channels ? weight[co * taps + tap] : 0.0f;
  }
  for (int i = tid; i < s.channel_stride; i += threads)
    smem[s.bias_at + i] = bias && i < s.out_channels ? bias[i] : 0.0f;
}

// s.tile images from first_image on, inside their zero padding; those from
// the real_images-th on (past the batch, or past a LeNet tile's own images)
// are all zeros. Four loads in flight per thread on the GPU: each waits on
// global memory.
LENET_HOST_DEVICE void stage_images(const ConvTileShape& s, const float* x, float* smem, int64_t first_image,
                                    int real_images, int tid, int threads) {
  // A plane is one input channel of one image; the real images have the first real_planes.
  const int real_planes = real_images * s.in_channels;
  const float* tile_x = x + first_image * s.in_channels * s.height * s.width;
  if (rows_in_quads(s, x)) {
    // A quad of four cells per item, a quarter of the items one at a time
    // takes, each of them an index walk, bounds tests and an address:
    // quad k of a padded row starts `lead` cells before column 4k, so that
    // quad 0 also takes the previous row's last `lead` cells (padding), and
    // one quad past the last row takes that row's.
    const int lead = s.x_at % 4;
    const int row_quads = s.padded_w / 4;
    const int quads = s.tile * s.in_channels * s.padded_h * row_quads + (lead > 0 ? 1 : 0);
    float* first_quad = smem + s.x_at - lead;
    IndexWalk<3> at(tid, threads, {0, s.padded_h, row_quads});  // (plane, padded row, quad of the row)
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
    for (int i = tid; i < quads; i += threads, at.advance()) {
      const int y = at.coord[1] - s.padding, column = 4 * at.coord[2] - lead - s.padding;
      const bool inside = at.coord[0] < real_planes && y >= 0 && y < s.height && column >= 0 && column < s.width;
      const int from = inside ? (at.coord[0] * s.height + y) * s.width + column : 0;
      copy4_or_zeros(tile_x + from, inside, first_quad + 4 * i);
    }
    return;
  }
  IndexWalk<3> at(tid, threads, {0, s.padded_h, s.padded_w});  // (plane, padded row, padded column)
#if defined(__CUDA_ARCH__)
#pragma unroll 4
#endif
  for (int i = tid; i < s.tile * s.in_channels * s.padded_h * s.padded_w; i += threads) {
    const int y = at.coord[1] - s.padding, xx = at.coord[2] - s.padding;
    const bool inside = at.coord[0] < real_planes && y >= 0 && y < s.height && xx >= 0 && xx < s.width;
    smem[s.x_at + i] = inside ? tile_x[(at.coord[0] * s.height + y) * s.width + xx] : 0.0f;
    at.advance();
  }
}

// Phase 0 of both programs.
LENET_HOST_DEVICE void stage(const ConvTileShape& s, int64_t batch, const float* x, const float* weight,
                             const float* bias, float* smem, int64_t tile_index, int tid, int threads) {
  stage_weights(s, weight, bias, smem, tid, threads);
  const int64_t first_image = tile_index * s.tile;
  stage_images(s, x, smem, first_image, tile_images(batch, first_image, s.tile), tid, threads);
}

// z of output channels first, first + 1, ... (G of them) at conv position
// (oh, ow) of one image of the tile. Channels past C_out have zero weights
// and bias; callers drop them.
template <int G>
LENET_HOST_DEVICE void conv_channels(const ConvTileShape& s, const float* smem, int image, int first, int oh, int ow,
                                     float (&z)[G]) {
  load_group(smem + s.bias_at + first, z);
  const float* weights = smem + group_weights_at(s, first, 0);
  const float* image_x = smem + s.x_at + image * s.in_channels * s.padded_h * s.padded_w;
  for (int ci = 0; ci < s.in_channels; ++ci) {
    for (int kh = 0; kh < s.kernel; ++kh) {
      const float* row = image_x + (ci * s.padded_h + oh + kh) * s.padded_w + ow;
      const int tap = (ci * s.kernel + kh) * s.kernel;
      for (int kw = 0; kw < s.kernel; ++kw) {
        const float value = row[kw];
        float w[G];
        load_group(weights + (tap + kw) * G, w);
        LENET_UNROLL
        for (int c = 0; c < G; ++c) z[c] += value * w[c];
      }
    }
  }
}

// z of every conv position of pooled output (ph, pw) for a group of G
// channels: calls fn(dy, dx, z) for the pool x pool positions
// (ph * pool + dy, ...). LeNet's shape (pool 2, kernel 5) holds the window's
// 6 x 6 inputs of an input channel in registers, read once for the 4
// positions and the G channels that share them, and its 4 x G sums; other
// shapes compute one position at a time. kPairs: the window's rows are read
// two floats at a time, which needs every window on an even offset.
template <int P, int K, int G, bool kPairs, typename Fn>
LENET_HOST_DEVICE void window_z_unrolled(const ConvTileShape& s, const float* smem, int image, int first, int ph,
                                         int pw, const Fn& fn) {
  constexpr int kSide = P + K - 1;
  float z[P * P][G];
  float bias[G];
  load_group(smem + s.bias_at + first, bias);
  LENET_UNROLL
  for (int q = 0; q < P * P; ++q) {
    LENET_UNROLL
    for (int c = 0; c < G; ++c) z[q][c] = bias[c];
  }
  // Input channel ci's window, a plane further for each ci, and the group's
  // filter over it: the patch's and the taps' offsets are then constants.
  const float* top = smem + s.x_at + (image * s.in_channels * s.padded_h + ph * P) * s.padded_w + pw * P;
  const float* group_weights = smem + group_weights_at(s, first, 0);
  for (int ci = 0; ci < s.in_channels; ++ci, top += s.padded_h * s.padded_w) {
    const float* weights = group_weights + ci * (K * K * G);
    float patch[kSide][kSide];
    LENET_UNROLL
    for (int r = 0; r < kSide; ++r) {
      if constexpr (kPairs) {
        static_assert(kSide % 2 == 0, "a window row of whole pairs");
        LENET_UNROLL
        for (int c = 0; c < kSide; c += 2) {
          float pair[2];
          load2(top + r * s.padded_w + c, pair);
          patch[r][c] = pair[0], patch[r][c + 1] = pair[1];
        }
      } else {
        LENET_UNROLL
        for (int c = 0; c < kSide; ++c) patch[r][c] = top[r * s.padded_w + c];
      }
    }
    LENET_UNROLL
    for (int kh = 0; kh < K; ++kh) {
      LENET_UNROLL
      for (int kw = 0; kw < K; ++kw) {
        float w[G];
        load_group(weights + (kh * K + kw) * G, w);
        LENET_UNROLL
        for (int dy = 0; dy < P; ++dy) {
          LENET_UNROLL
          for (int dx = 0; dx < P; ++dx) {
            LENET_UNROLL
            for (int c = 0; c < G; ++c) z[dy * P + dx][c] += patch[kh + dy][kw + dx] * w[c];
          }
        }
      }
    }
  }
  for (int dy = 0; dy < P; ++dy)
    for (int dx = 0; dx < P; ++dx) fn(dy, dx, z[dy * P + dx]);
}

template <int G = kChannelsPerThread, typename Fn>
LENET_HOST_DEVICE void window_z(const ConvTileShape& s, const float* smem, int image, int first, int ph, int pw,
                                const Fn& fn) {
#if !defined(__CUDA_ARCH__)
  // The items read the weights in groups of G, the layout they were staged in
  // (group_weights_at): the CPU emulation stops on a mismatch, for the tests.
  if (s.group_width != G) throw std::logic_error("lenet_ext: a conv item's channel group is not the weights' layout");
#endif
  if (s.pool == 2 && s.kernel == 5) {
    // A window starts at an even column of an even row of an image's planes:
    // on an even offset when the rows and the buffer's start are (LeNet's).
    if (s.padded_w % 2 == 0 && s.x_at % 2 == 0)
      window_z_unrolled<2, 5, G, true>(s, smem, image, first, ph, pw, fn);
    else
      window_z_unrolled<2, 5, G, false>(s, smem, image, first, ph, pw, fn);
    return;
  }
  for (int dy = 0; dy < s.pool; ++dy) {
    for (int dx = 0; dx < s.pool; ++dx) {
      float z[G];
      conv_channels(s, smem, image, first, ph * s.pool + dy, pw * s.pool + dx, z);
      fn(dy, dx, z);
    }
  }
}

// A work item of the channel-group phases: one image of the tile, output
// channels first, first + 1, ..., and one position of a height x width plane.
struct ChannelGroupItem {
  int image, first, row, col;
};

template <int G = kChannelsPerThread>
LENET_HOST_DEVICE int channel_group_items(const ConvTileShape& s, int height, int width) {
  return s.tile * channel_groups<G>(s) * height * width;
}

// Calls fn(item) for each of thread tid's items of groups of G channels of a
// height x width plane, in the order (image, row, column, group):
// neighbouring threads take a position's groups, which read the same inputs,
// so that shared memory serves them as one (a broadcast), and then
// neighbouring positions. With the group outermost, a warp's threads would
// read as many windows as there are threads, more of them in the same banks.
template <int G, typename Fn>
LENET_HOST_DEVICE void for_each_channel_group_item(const ConvTileShape& s, int height, int width, int tid,
                                                   int threads, const Fn& fn) {
  IndexWalk<4> at(tid, threads, {0, height, width, channel_groups<G>(s)});  // (image, row, column, group)
  for (int i = tid; i < channel_group_items<G>(s, height, width); i += threads, at.advance())
    fn(ChannelGroupItem{at.coord[0], at.coord[3] * G, at.coord[1], at.coord[2]});
}

// The pooled outputs (ph, pw) of a group of G channels: the mean of
// sigmoid(z) over the window.
template <int G = kChannelsPerThread>
LENET_HOST_DEVICE void pooled_group(const ConvTileShape& s, const float* smem, int image, int first, int ph, int pw,
                                    float (&out)[G]) {
  float sum[G] = {};
  window_z<G>(s, smem, image, first, ph, pw, [&](int, int, const float (&z)[G]) {
    // Every channel's sigmoid, those callers drop (past C_out, where z is 0)
    // masked: a test around each would make it a branch of its own.
    LENET_UNROLL
    for (int c = 0; c < G; ++c) {
      const float a = tile_sigmoid(z[c]);
      sum[c] += first + c < s.out_channels ? a : 0.0f;
    }
  });
  LENET_UNROLL
  for (int c = 0; c < G; ++c) out[c] = window_mean(s, sum[c]);
}

// Forward phase 1: the pooled outputs.
LENET_HOST_DEVICE void pooled_outputs(const ConvTileForwardParams& p, const float* smem, int64_t tile_index, int tid,
                                      int threads) {
  const ConvTileShape& s = p.s;
  const auto per_item = [&](const ChannelGroupItem& item) {
    const auto [image, first, ph, pw] = item;
    const int64_t n = tile_index * s.tile + image;
    if (n >= p.batch) return;
    float out[kChannelsPerThread];
    pooled_group(s, smem, image, first, ph, pw, out);
    LENET_UNROLL
    for (int c = 0; c < kChannelsPerThread; ++c)
      if (first + c < s.out_channels) p.out[((n * s.out_channels + first + c) * s.out_h + ph) * s.out_w + pw] = out[c];
  };
  for_each_channel_group_item<kChannelsPerThread>(s, s.out_h, s.out_w, tid, threads, per_item);
}

}  // namespace conv_tile_phases

// The forward program, as the CUDA kernel (../cuda/tile_program.cuh) and the
// CPU emulation (tile_emulation.cpp) run it.
struct ConvTileForwardProgram {
  using Params = ConvTileForwardParams;
  static constexpr const char* kName = "ConvTileForwardProgram";
  static constexpr int kPhases = 2;
  static constexpr const char* kPhaseNames[kPhases] = {"stage", "pooled outputs"};
  // Images per block that choose_tile (../cuda/tile_program.cuh) tries, in order.
  static constexpr int kTileCandidates[] = {8, 4, 2, 1};

  // One phase for thread tid of `threads`.
  static LENET_HOST_DEVICE void run_phase(int phase, const Params& p, float* smem, int64_t tile_index, int tid,
                                          int threads) {
    using namespace conv_tile_phases;
    if (phase == 0)
      stage(p.s, p.batch, p.x, p.weight, p.bias, smem, tile_index, tid, threads);
    else
      pooled_outputs(p, smem, tile_index, tid, threads);
  }
};

}  // namespace lenet_ext
