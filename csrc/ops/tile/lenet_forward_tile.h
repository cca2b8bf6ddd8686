// LeNet's whole forward for a tile of images, written as the program of one
// CUDA thread block: phases separated by barriers, each phase a loop of work
// items that the block's threads share out (item = thread, thread + threads,
// ...). Every activation of the tile stays in the block's shared memory; x
// is read from global memory, and only the logits are written to it, plus,
// for lenet_train_forward, the activations its backward reads.
//
//   stage | conv block 1 | conv block 2, staging the second pass | conv block
//   1, second pass | conv block 2, second pass | fc1 slices | fc1 | fc2
//   slices | fc2 | fc3 slices | logits
//
// The conv blocks take a tile's images in two passes when it has more than
// kConvPassImages of them, through buffers for one pass, and the dense
// phases take the whole tile at once: each fc1 weight a block reads from L2
// then serves twice the images, where fc1's weights (192 KB for LeNet) are
// most of what a block reads.
//
// The phases are __host__ __device__ and take the thread's coordinates as
// arguments, so the same code runs in two places:
//   ../cuda/lenet_cuda.cu   the kernel: one thread block per tile
//   tile_emulation.cpp      the CPU, thread by thread and phase by phase,
//                           for the tests (see there)
// float32 only; the index math inside a tile is 32-bit.
#pragma once

#include <cstdint>
#include <type_traits>

#include "conv_sigmoid_avgpool2d_tile.h"

namespace lenet_ext {

// The conv blocks' items take a group of output channels at one pooled
// position: each input value loaded from shared memory feeds the group's
// multiply-adds, and each weight load the window's four positions. The
// groups fit LeNet's channels, 6 and 16, with no empty slot (other channel
// counts fill their last group with zero weights). Against wide groups:
// fewer items, each longer, which a tile of one image (small batches) feels
// as a longer phase.
constexpr int kConv1ChannelsPerItem = 6;
constexpr int kConv2ChannelsPerItem = 8;
// Conv block 2's groups for a pass whose kConv2ChannelsPerItem-wide items
// would fill under half of a block's threads (LeNet's 50 per image: passes
// of one or two images, the tiles of small batches), where a phase lasts
// as long as its longest thread: four times the items, each a quarter as
// long.
constexpr int kConv2NarrowChannelsPerItem = 2;

// The dense phases split each output feature's dot products into
// kDenseSlices slices: slice s takes every kDenseSlices-th group of four
// inputs, so the slices of a feature read consecutive 16-byte pieces of its
// weight row and a warp reads whole 128-byte lines of four rows. A thread
// keeps the sums of kForwardDenseImages images in registers, so that each
// weight it loads serves a whole tile of two conv passes; lenet_backward's
// products (lenet_backward_tile.h) keep kDenseImages.
constexpr int kDenseSlices = 8;
constexpr int kDenseImages = 8;
// A conv pass takes at most this many images when a tile has two: LeNet's
// conv block 2 has 50 items per image (two groups of eight channels at 25
// positions), and 5 images are 250, one nearly whole round of 256 threads.
constexpr int kConvPassImages = 5;
constexpr int kForwardDenseImages = 2 * kConvPassImages;
// A slice loads the weights of this many of its groups before it uses any:
// their trips to L2 overlap, where one load at a time made each of the
// slice's groups wait for its own (the whole phase, at small tiles). LeNet's
// fc1 slices have 12 or 13 groups: two trips, no more than at eight, and the
// registers an eighth load would take go to the conv phases, the kernel's
// largest need.
constexpr int kDenseWeightLoads = 7;

// Sizes of one call and where each of the tile's buffers sits in shared
// memory (offsets in floats). Computed once on the host by make_tile_shape.
// The conv blocks are two views of the conv operator's tile layout
// (conv_sigmoid_avgpool2d_tile.h), of one pass's images, with their buffers
// at this program's offsets: conv1 reads x, conv2 reads block 1's output
// with conv2's zero padding around it, and both stage their weights group
// by group. The dense layers' slices reuse the space of x and block 1, and
// fc1's and fc2's outputs that of block 2, each dead by then.
struct LeNetTileShape {
  ConvTileShape conv1, conv2;         // their tile: the images of one conv pass
  int f0, f1, f2, f3;                 // dense widths: f0 = c2 * h2 * w2 in, f3 = classes out
  int tile;                           // images per thread block
  int conv_passes;                    // 1, or 2 when tile > kConvPassImages
  int slices_at;                      // the dense layers' slices, over x and block 1
  int block2_at;                      // block 2's output, conv_passes * conv1.tile images
  int fc1_at, fc2_at;                 // `tile` images each, over block 2, 16-byte aligned
  int floats;                         // shared memory in all
};

// A dense layer's parameters; in_float4s when its rows are read four floats
// at a time (in_features a multiple of 4 and the weights 16-byte aligned).
struct TileDenseLayer {
  const float *weight, *bias;  // bias may be null
  int in_features, out_features;
  bool in_float4s;
};

struct LeNetTileParams {
  LeNetTileShape s;
  int64_t batch;
  const float* x;
  const float *conv1_w, *conv1_b, *conv2_w, *conv2_b;  // a bias may be null
  TileDenseLayer fc1, fc2, fc3;
  float* logits;
  // lenet_train_forward's saved activations, (N, ...) as it returns them;
  // null for lenet_forward.
  float *block1, *block2, *fc1_out, *fc2_out;
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
  s.conv_passes = tile > kConvPassImages ? 2 : 1;
  const int pass_images = (tile + s.conv_passes - 1) / s.conv_passes;
  s.conv1 = make_conv_tile_shape(g1, pass_images, 0, kConv1ChannelsPerItem);
  const ConvTileShape wide = make_conv_tile_shape(g2, pass_images, 0, kConv2ChannelsPerItem);
  const int wide_items = conv_tile_phases::channel_group_items<kConv2ChannelsPerItem>(wide, wide.out_h, wide.out_w);
  s.conv2 = 2 * wide_items < kTileProgramThreads ? make_conv_tile_shape(g2, pass_images, 0, kConv2NarrowChannelsPerItem)
                                                 : wide;
  s.f0 = c2 * s.conv2.out_h * s.conv2.out_w, s.f1 = f1, s.f2 = f2, s.f3 = f3;
  s.tile = tile;
  AlignedBuffers buffers(0);
  for (ConvTileShape* conv : {&s.conv1, &s.conv2}) {
    conv->weight_at = buffers.take(conv->in_channels * conv->kernel * conv->kernel * conv->channel_stride);
    conv->bias_at = buffers.take(conv->channel_stride);
  }
  // x (with the room place_images leaves around it) and block 1 one after
  // the other, where the slices go later.
  const ImagesPlace x = place_images(s.conv1, buffers.end);
  const int x_floats = (x.end - buffers.end + 3) / 4 * 4;  // block 1 on 16 bytes too
  const int block1_floats = pass_images * c1 * s.conv2.padded_h * s.conv2.padded_w;
  const int widest = f1 > f2 ? (f1 > f3 ? f1 : f3) : (f2 > f3 ? f2 : f3);
  const int slice_floats = tile * widest * kDenseSlices;
  s.slices_at = buffers.take(x_floats + block1_floats > slice_floats ? x_floats + block1_floats : slice_floats);
  s.conv1.x_at = x.x_at;
  s.conv2.x_at = s.slices_at + x_floats;
  const int fc1_floats = (tile * f1 + 3) / 4 * 4, block2_floats = s.conv_passes * pass_images * s.f0;
  s.block2_at = buffers.take(block2_floats > fc1_floats + tile * f2 ? block2_floats : fc1_floats + tile * f2);
  s.fc1_at = s.block2_at, s.fc2_at = s.block2_at + fc1_floats;
  s.floats = s.conv1.floats = s.conv2.floats = buffers.end;
  return s;
}

// The same sizes with another number of images per block.
inline LeNetTileShape retile(const LeNetTileShape& s, int tile) {
  const ConvTileShape &a = s.conv1, &b = s.conv2;
  return make_tile_shape(a.in_channels, a.height, a.width, a.out_channels, a.kernel, a.padding, a.pool,
                         b.out_channels, b.kernel, b.padding, b.pool, s.f1, s.f2, s.f3, tile);
}

namespace tile_phases {

// The first image of a tile's conv pass, its slot among the tile's images,
// and how many of its images are real (the rest, past the batch or past the
// tile, are zeros that no phase stores to global memory).
struct ConvPass {
  int64_t first_image;
  int first_slot, real_images;
};

LENET_HOST_DEVICE ConvPass conv_pass(const LeNetTileParams& p, int64_t tile_index, int pass) {
  const LeNetTileShape& s = p.s;
  const int first_slot = pass * s.conv1.tile;
  const int64_t first_image = tile_index * s.tile + first_slot;
  const int own = s.conv1.tile < s.tile - first_slot ? s.conv1.tile : s.tile - first_slot;
  const int real = tile_images(p.batch, first_image, own);
  return ConvPass{first_image, first_slot, real > 0 ? real : 0};
}

// A pass's images with their zero padding (phase 0 for the first pass, with
// both conv blocks' weights and biases; phase 2, behind conv block 2, for the
// second). Block 1's padded buffer is zeroed when conv2 pads, once: the
// passes' conv block 1 fill its interior, which without padding is all of it.
LENET_HOST_DEVICE void stage(const LeNetTileParams& p, float* smem, int64_t tile_index, int pass, int tid,
                             int threads) {
  const LeNetTileShape& s = p.s;
  const ConvPass at = conv_pass(p, tile_index, pass);
  conv_tile_phases::stage_images(s.conv1, p.x, smem, at.first_image, at.real_images, tid, threads);
  if (pass > 0) return;
  conv_tile_phases::stage_weights(s.conv1, p.conv1_w, p.conv1_b, smem, tid, threads);
  conv_tile_phases::stage_weights(s.conv2, p.conv2_w, p.conv2_b, smem, tid, threads);
  const ConvTileShape& b1 = s.conv2;  // block 1's output, as conv2 reads it
  if (b1.padding == 0) return;
  for (int i = tid; i < b1.tile * b1.in_channels * b1.padded_h * b1.padded_w; i += threads) smem[b1.x_at + i] = 0.0f;
}

// A conv block's pooled outputs of one group of G channels, its first
// `channels` (the rest lie past C_out): channel c to to_smem[c * smem_plane]
// and, unless to_global is null, to to_global[c * global_plane].
template <int G>
LENET_HOST_DEVICE void store_group(const float (&out)[G], int channels, float* to_smem, int smem_plane,
                                   float* to_global, int global_plane) {
  LENET_UNROLL
  for (int c = 0; c < G; ++c) {
    if (c >= channels) break;
    to_smem[c * smem_plane] = out[c];
    if (to_global) to_global[c * global_plane] = out[c];
  }
}

// Conv block 1 of a pass into the interior of its padded buffer, a channel
// group of one pooled output per item.
LENET_HOST_DEVICE void conv_block1(const LeNetTileParams& p, float* smem, int64_t tile_index, int pass, int tid,
                                   int threads) {
  const ConvTileShape &c1 = p.s.conv1, &b1 = p.s.conv2;
  const ConvPass at = conv_pass(p, tile_index, pass);
  using conv_tile_phases::ChannelGroupItem;
  const auto per_item = [&](const ChannelGroupItem& item) {
    const auto [image, first, ph, pw] = item;
    float out[kConv1ChannelsPerItem];
    conv_tile_phases::pooled_group(c1, smem, image, first, ph, pw, out);
    // Channel first + c's output is c planes on, in shared memory and in p.block1.
    float* to_smem = smem + b1.x_at +
                     ((image * b1.in_channels + first) * b1.padded_h + ph + b1.padding) * b1.padded_w + pw + b1.padding;
    const int64_t n = at.first_image + image;
    float* to_global = p.block1 && image < at.real_images
                           ? p.block1 + ((n * c1.out_channels + first) * c1.out_h + ph) * c1.out_w + pw
                           : nullptr;
    store_group(out, c1.out_channels - first, to_smem, b1.padded_h * b1.padded_w, to_global, c1.out_h * c1.out_w);
  };
  conv_tile_phases::for_each_channel_group_item<kConv1ChannelsPerItem>(c1, c1.out_h, c1.out_w, tid, threads, per_item);
}

// Conv block 2 of a pass, flattened as nn.Flatten orders it (c, h, w), into
// the pass's slots of block 2's buffer, in items of G channels.
template <int G>
LENET_HOST_DEVICE void conv_block2_groups(const LeNetTileParams& p, float* smem, int64_t tile_index, int pass,
                                          int tid, int threads) {
  const LeNetTileShape& s = p.s;
  const ConvTileShape& c2 = s.conv2;
  const ConvPass at = conv_pass(p, tile_index, pass);
  using conv_tile_phases::ChannelGroupItem;
  const auto per_item = [&](const ChannelGroupItem& item) {
    const auto [image, first, ph, pw] = item;
    float out[G];
    conv_tile_phases::pooled_group(c2, smem, image, first, ph, pw, out);
    // Channel first + c's feature is c planes on.
    const int feature = (first * c2.out_h + ph) * c2.out_w + pw;
    float* to_smem = smem + s.block2_at + (at.first_slot + image) * s.f0 + feature;
    float* to_global = p.block2 && image < at.real_images ? p.block2 + (at.first_image + image) * s.f0 + feature : nullptr;
    store_group(out, c2.out_channels - first, to_smem, c2.out_h * c2.out_w, to_global, c2.out_h * c2.out_w);
  };
  conv_tile_phases::for_each_channel_group_item<G>(c2, c2.out_h, c2.out_w, tid, threads, per_item);
}

// Conv block 2 of a pass, in the groups its layout was made for.
LENET_HOST_DEVICE void conv_block2(const LeNetTileParams& p, float* smem, int64_t tile_index, int pass, int tid,
                                   int threads) {
  if (p.s.conv2.group_width == kConv2NarrowChannelsPerItem)
    conv_block2_groups<kConv2NarrowChannelsPerItem>(p, smem, tile_index, pass, tid, threads);
  else
    conv_block2_groups<kConv2ChannelsPerItem>(p, smem, tile_index, pass, tid, threads);
}

// Dense phase, part one, for groups of W inputs (4: float4 loads; 1: any
// row): slice `slice` of feature j's dot products with the inputs of M
// images, first, first + 1, ... The image count is a template argument so
// that the loop over images has no tests: each group's input of an image
// is one load and W multiply-adds.
template <int W, int M>
LENET_HOST_DEVICE void dense_slice(const TileDenseLayer& layer, const float* in, int j, int slice, int first,
                                   float (&sum)[kForwardDenseImages]) {
  // The slice's groups are kDenseSlices groups apart: group `base + u *
  // kDenseSlices` lies u * kStep floats past group `base`: a trip's loads
  // are constant offsets from its pointers, not sums with the group index.
  constexpr int kStep = W * kDenseSlices;
  const int groups = layer.in_features / W;
  const float* row = layer.weight + static_cast<int64_t>(j) * layer.in_features;
  for (int base = slice; base < groups; base += kDenseWeightLoads * kDenseSlices) {
    const float* weights = row + W * base;
    const float* inputs = in + first * layer.in_features + W * base;
    float w[kDenseWeightLoads][4] = {};
    LENET_UNROLL
    for (int u = 0; u < kDenseWeightLoads; ++u) {
      if (base + u * kDenseSlices >= groups) continue;
      if (W == 4)
        load4(weights + u * kStep, w[u]);
      else
        w[u][0] = weights[u * kStep];
    }
    LENET_UNROLL
    for (int u = 0; u < kDenseWeightLoads; ++u) {
      if (base + u * kDenseSlices >= groups) continue;
      LENET_UNROLL
      for (int m = 0; m < M; ++m) {
        float value[4];
        const float* v = inputs + m * layer.in_features + u * kStep;
        if (W == 4)
          load4(v, value);
        else
          value[0] = v[0];
        LENET_UNROLL
        for (int k = 0; k < W; ++k) sum[m] += value[k] * w[u][k];
      }
    }
  }
}

// Calls fn(std::integral_constant<int, M>{}) with M = images, for
// 1 <= images <= Max (Max for any larger count).
template <int Max, int M = 1, typename Fn>
LENET_HOST_DEVICE void with_image_count(int images, const Fn& fn) {
  if constexpr (M == Max) {
    fn(std::integral_constant<int, M>{});
  } else {
    if (images == M)
      fn(std::integral_constant<int, M>{});
    else
      with_image_count<Max, M + 1>(images, fn);
  }
}

// Dense phase, part one: every (feature, slice) item's sums over the tile's
// images into slices[image][feature * kDenseSlices + slice].
LENET_HOST_DEVICE void dense_slices(const TileDenseLayer& layer, const float* in, int tile, float* slices, int tid,
                                    int threads) {
  const int items = layer.out_features * kDenseSlices;
  for (int i = tid; i < items; i += threads) {
    const int j = i / kDenseSlices, slice = i % kDenseSlices;
    for (int first = 0; first < tile; first += kForwardDenseImages) {
      float sum[kForwardDenseImages] = {};
      const int images = tile - first < kForwardDenseImages ? tile - first : kForwardDenseImages;
      with_image_count<kForwardDenseImages>(images, [&](auto m) {
        if (layer.in_float4s)
          dense_slice<4, m>(layer, in, j, slice, first, sum);
        else
          dense_slice<1, m>(layer, in, j, slice, first, sum);
      });
      LENET_UNROLL
      for (int m = 0; m < kForwardDenseImages; ++m)
        if (m < images) slices[(first + m) * items + i] = sum[m];
    }
  }
}

// Dense phase, part two: out[image][j] = bias[j] + the slices of (image, j)
// in slice order, through the sigmoid unless this is the last layer: into
// smem_out for every image of the tile, and into global_out (null for none)
// for the tile's real images, whose first is row `first` there.
LENET_HOST_DEVICE void dense_finish(const TileDenseLayer& layer, const float* slices, int tile, int images,
                                    bool apply_sigmoid, float* smem_out, float* global_out, int64_t first, int tid,
                                    int threads) {
  const int features = layer.out_features;
  for (int i = tid; i < tile * features; i += threads) {
    const int image = i / features, j = i % features;
    const float* parts = slices + (image * features + j) * kDenseSlices;
    float z = layer.bias ? layer.bias[j] : 0.0f;
    for (int slice = 0; slice < kDenseSlices; ++slice) z += parts[slice];
    const float out = apply_sigmoid ? tile_sigmoid(z) : z;
    if (smem_out) smem_out[i] = out;
    if (global_out && image < images) global_out[(first + image) * features + j] = out;
  }
}

}  // namespace tile_phases

// The program, as the CUDA kernel (../cuda/tile_program.cuh) and the CPU
// emulation (tile_emulation.cpp) run it.
struct LeNetTileProgram {
  using Params = LeNetTileParams;
  static constexpr const char* kName = "LeNetTileProgram";
  static constexpr int kPhases = 11;
  static constexpr const char* kPhaseNames[kPhases] = {
      "stage", "conv block 1", "conv block 2, staging the second pass", "conv block 1, second pass",
      "conv block 2, second pass", "fc1 slices", "fc1", "fc2 slices", "fc2", "fc3 slices", "logits"};
  // Images per block that choose_tile (../cuda/tile_program.cuh) tries, in order.
  // 10: two conv passes of kConvPassImages, with the dense layers' weights
  // read once for the ten; its buffers, like 5's, leave room for three
  // blocks per multiprocessor. 5 before 4: conv block 2's phase of 5 images
  // is one nearly whole round of 256 threads. scripts/tile_sweep.py times
  // each tile.
  static constexpr int kTileCandidates[] = {10, 5, 4, 2, 1};
  // Three blocks per multiprocessor, as their buffers allow at a tile of 10
  // (LeNet's: 17,580 floats, 68.7 KiB; three, each with the 1 KiB a block
  // reserves, fit an H100's 228 KiB): registers at most 85 a thread, where
  // the dense phases' ten images would take the compiler to 97 on sm_90, and
  // the multiprocessor down to two blocks.
  static constexpr int kMinResidentBlocks = 3;

  // One phase for thread tid of `threads`.
  static LENET_HOST_DEVICE void run_phase(int phase, const Params& p, float* smem, int64_t tile_index, int tid,
                                          int threads) {
    using namespace tile_phases;
    const LeNetTileShape& s = p.s;
    // The tile's real images (the last tile may be partial): only they go to global memory.
    const int64_t first = tile_index * s.tile;
    const int images = tile_images(p.batch, first, s.tile);
    float* slices = smem + s.slices_at;
    const bool two_passes = s.conv_passes == 2;
    // Each conv block has one call for both passes (phases 1 and 3, 2 and 4),
    // so that its code is compiled once: blocks of a multiprocessor in either
    // pass then share its loops in the instruction cache.
    switch (phase) {
      case 0: stage(p, smem, tile_index, 0, tid, threads); break;
      case 1:
      case 3:
        if (phase == 1 || two_passes) conv_block1(p, smem, tile_index, phase / 3, tid, threads);
        break;
      case 2:
      case 4:
        if (phase == 2 || two_passes) conv_block2(p, smem, tile_index, phase / 4, tid, threads);
        // x is dead once conv block 1 has read it: the second pass's images
        // load while other warps still compute, behind this phase's work.
        if (phase == 2 && two_passes) stage(p, smem, tile_index, 1, tid, threads);
        break;
      case 5: dense_slices(p.fc1, smem + s.block2_at, s.tile, slices, tid, threads); break;
      case 6: dense_finish(p.fc1, slices, s.tile, images, true, smem + s.fc1_at, p.fc1_out, first, tid, threads); break;
      case 7: dense_slices(p.fc2, smem + s.fc1_at, s.tile, slices, tid, threads); break;
      case 8: dense_finish(p.fc2, slices, s.tile, images, true, smem + s.fc2_at, p.fc2_out, first, tid, threads); break;
      case 9: dense_slices(p.fc3, smem + s.fc2_at, s.tile, slices, tid, threads); break;
      default: dense_finish(p.fc3, slices, s.tile, images, false, nullptr, p.logits, first, tid, threads);
    }
  }
};

}  // namespace lenet_ext
