// lenet_backward's first program, for a tile of images: the dense layers'
// chain of gradients and conv block 2's backward, as one CUDA thread block.
// The gradient flowing into block 2 never leaves shared memory.
//
//   stage | fc2 grads | fc1 grads | dL/d(block 2), dense bias sums
//   | conv 2: dL/dz | dL/d(block 1), slices of its weight and bias sums
//   | the slices added
//
// What it writes to global memory: the gradients of fc1's and fc2's
// pre-activations (N, f1) and (N, f2), which the dense weight gradients are
// made of (dense_weight_grads_tile.h); dL/d(block 1) when anything below conv2 is asked for,
// which conv block 1's backward program (conv_sigmoid_avgpool2d_tile_backward.h)
// reads; and one row of partial sums per tile, [fc1 bias | fc2 bias | fc3
// bias | conv2 weight | conv2 bias] (the conv2 part only when conv2 runs),
// which tile_partial_sums.h adds. The host side is in lenet_backward_tile_call.cpp.
//
// Like the forward's (lenet_forward_tile.h), the phases are __host__
// __device__ over the thread's coordinates: ../cuda/lenet_cuda.cu launches them,
// tile_emulation.cpp runs them on the CPU for the tests. float32 only.
#pragma once

#include <cstdint>

#include "conv_sigmoid_avgpool2d_tile_backward.h"
#include "lenet_forward_tile.h"

namespace lenet_ext {

// Sizes and the shared-memory layout (offsets in floats): conv2's backward
// layout first (its weights, block 1 with conv2's padding, dL/dz, slices),
// then the dense gradients of the tile's images.
struct LeNetBackwardTileShape {
  ConvTileShape conv2;
  int f0, f1, f2, f3;  // dense widths: f0 = block 2's features, f3 = classes
  int tile;
  int g3_at, g2_at, g1_at, grad_block2_at;  // (tile, f3), (tile, f2), (tile, f1), (tile, f0)
  int dense_columns;                        // f1 + f2 + f3: the bias sums at the start of a partials row
  int floats;
};

inline LeNetBackwardTileShape make_backward_tile_shape(const ConvPoolGeometry& g2, int f1, int f2, int f3, int tile,
                                                       int threads) {
  LeNetBackwardTileShape s{};
  s.conv2 = make_conv_tile_shape(g2, tile, threads);
  s.f0 = s.conv2.out_channels * s.conv2.out_h * s.conv2.out_w, s.f1 = f1, s.f2 = f2, s.f3 = f3;
  s.tile = tile;
  AlignedBuffers buffers(s.conv2.floats);  // transposed_product reads g four floats at a time
  s.g3_at = buffers.take(tile * f3);
  s.g2_at = buffers.take(tile * f2);
  s.g1_at = buffers.take(tile * f1);
  s.grad_block2_at = buffers.take(tile * s.f0);
  s.dense_columns = f1 + f2 + f3;
  s.floats = buffers.end;
  return s;
}

struct LeNetBackwardTileParams {
  LeNetBackwardTileShape s;
  int64_t batch;
  const float* grad_logits;             // (N, f3)
  const float *fc1, *fc2;               // the saved sigmoids, (N, f1) and (N, f2)
  const float* block1;                  // the saved output of block 1: conv2's input
  const float *conv2_w, *conv2_b;       // conv2_b may be null
  const float *fc1_w, *fc2_w, *fc3_w;   // (f1, f0), (f2, f1), (f3, f2)
  float *g1, *g2;                       // out: (N, f1), (N, f2)
  float* grad_block1;                   // out: like block1; null when nothing below conv2 is asked for
  float* partials;                      // out: (tiles, row_length)
  bool conv2;                           // whether anything at or below conv2 is asked for
  int row_length;                       // dense_columns, plus conv2's parameters when conv2
};

namespace backward_tile_phases {

// out[m][i] = the sum over k of g[m][k] * weight[k][i] for the M images
// first, first + 1, ..., in k order: the product with a transposed weight, a
// column per item, so that neighbouring threads read neighbouring floats of
// a weight row. g is read W floats at a time (4: a vector load, for rows a
// multiple of four), and M is a template argument (lenet_forward_tile.h's
// with_image_count), so that the loop over images has no tests.
template <int W, int M>
LENET_HOST_DEVICE void transposed_product(const float* weight, int rows, int cols, const float* g, int i, int first,
                                          float (&out)[kDenseImages]) {
  const float* g_first = g + first * rows;
#if defined(__CUDA_ARCH__)
// Thirty-two weight loads in flight: at small tiles the loop waits on L2, and
// a column of fc1's 120 rows takes four trips there instead of fifteen at
// eight. The conv2 phases set the kernel's registers (80 on sm_90).
#pragma unroll(32 / W)
#endif
  for (int k = 0; k < rows; k += W) {
    float w[W];
    LENET_UNROLL
    for (int t = 0; t < W; ++t) w[t] = weight[static_cast<int64_t>(k + t) * cols + i];
    LENET_UNROLL
    for (int m = 0; m < M; ++m) {
      float v[4];
      if (W == 4)
        load4(g_first + m * rows + k, v);
      else
        v[0] = g_first[m * rows + k];
      LENET_UNROLL
      for (int t = 0; t < W; ++t) out[m] += v[t] * w[t];
    }
  }
}

// transposed_product for the images first, first + 1, ... below `tile`, at
// most kDenseImages of them; g is 16-byte aligned.
LENET_HOST_DEVICE void transposed_product(const float* weight, int rows, int cols, const float* g, int tile, int i,
                                          int first, float (&out)[kDenseImages]) {
  const int images = tile - first < kDenseImages ? tile - first : kDenseImages;
  tile_phases::with_image_count<kDenseImages>(images, [&](auto m) {
    if (rows % 4 == 0)
      transposed_product<4, m>(weight, rows, cols, g, i, first, out);
    else
      transposed_product<1, m>(weight, rows, cols, g, i, first, out);
  });
}

// The gradient of a hidden layer's pre-activation: (g_above x weight_above)
// times the sigmoid's derivative a (1 - a), a the saved activation (N, width)
// of the tile's real images; zero for the images past the batch. Into shared
// memory (tile, width) and global memory.
LENET_HOST_DEVICE void hidden_grads(const float* weight_above, int rows, int width, const float* g_above,
                                    const float* saved, int tile, int images, float* smem_out, float* global_out,
                                    int tid, int threads) {
  const int groups = (tile + kDenseImages - 1) / kDenseImages;
  for (int item = tid; item < width * groups; item += threads) {
    const int i = item % width, first = item / width * kDenseImages;
    float sum[kDenseImages] = {};
    transposed_product(weight_above, rows, width, g_above, tile, i, first, sum);
    LENET_UNROLL
    for (int m = 0; m < kDenseImages; ++m) {
      const int image = first + m;
      if (image >= tile) continue;
      float g = 0.0f;
      if (image < images) {
        const float a = saved[image * width + i];
        g = sum[m] * a * (1.0f - a);
        global_out[image * width + i] = g;
      }
      smem_out[image * width + i] = g;
    }
  }
}

// Phase 0: grad_logits of the tile (zeros past the batch); for conv2, its
// weights and its input, block 1, with conv2's zero padding.
LENET_HOST_DEVICE void stage(const LeNetBackwardTileParams& p, float* smem, int64_t tile_index, int images, int tid,
                             int threads) {
  const LeNetBackwardTileShape& s = p.s;
  const float* grad_logits = p.grad_logits + tile_index * s.tile * s.f3;
  for (int i = tid; i < s.tile * s.f3; i += threads) smem[s.g3_at + i] = i < images * s.f3 ? grad_logits[i] : 0.0f;
  if (!p.conv2) return;
  conv_tile_phases::stage(s.conv2, p.batch, p.block1, p.conv2_w, p.conv2_b, smem, tile_index, tid, threads);
}

// Phase 3: dL/d(block 2) = g1 x fc1_w into shared memory (for conv2), and
// the tile's sums of g1, g2 and g3 (the bias gradients) into its row.
LENET_HOST_DEVICE void block2_grads_and_bias_sums(const LeNetBackwardTileParams& p, float* smem, float* row, int tid,
                                                  int threads) {
  const LeNetBackwardTileShape& s = p.s;
  const int groups = (s.tile + kDenseImages - 1) / kDenseImages;
  const int products = p.conv2 ? s.f0 * groups : 0;
  for (int item = tid; item < products + s.dense_columns; item += threads) {
    if (item < products) {
      const int i = item % s.f0, first = item / s.f0 * kDenseImages;
      float sum[kDenseImages] = {};
      transposed_product(p.fc1_w, s.f1, s.f0, smem + s.g1_at, s.tile, i, first, sum);
      LENET_UNROLL
      for (int m = 0; m < kDenseImages; ++m)
        if (first + m < s.tile) smem[s.grad_block2_at + (first + m) * s.f0 + i] = sum[m];
      continue;
    }
    // Columns in row order: g1's, g2's, g3's.
    const int column = item - products;
    const bool in_g1 = column < s.f1, in_g2 = !in_g1 && column < s.f1 + s.f2;
    const int width = in_g1 ? s.f1 : in_g2 ? s.f2 : s.f3;
    const int j = in_g1 ? column : in_g2 ? column - s.f1 : column - s.f1 - s.f2;
    const float* g = smem + (in_g1 ? s.g1_at : in_g2 ? s.g2_at : s.g3_at);
    float sum = 0.0f;
    for (int image = 0; image < s.tile; ++image) sum += g[image * width + j];
    row[column] = sum;
  }
}

}  // namespace backward_tile_phases

// The program, as the CUDA kernel (../cuda/tile_program.cuh) and the CPU
// emulation (tile_emulation.cpp) run it.
struct LeNetBackwardTileProgram {
  using Params = LeNetBackwardTileParams;
  static constexpr const char* kName = "LeNetBackwardTileProgram";
  static constexpr int kPhases = 7;
  static constexpr const char* kPhaseNames[kPhases] = {
      "stage",       "fc2 dL/dz",       "fc1 dL/dz",         "block 2 grads, bias sums",
      "conv2 dL/dz", "conv2 gradients", "conv2 slices added"};
  // Images per block that choose_tile (../cuda/tile_program.cuh) tries, in order.
  static constexpr int kTileCandidates[] = {8, 4, 2, 1};

  // One phase for thread tid of `threads`.
  static LENET_HOST_DEVICE void run_phase(int phase, const Params& p, float* smem, int64_t tile_index, int tid,
                                          int threads) {
    using namespace backward_tile_phases;
    const LeNetBackwardTileShape& s = p.s;
    const ConvTileShape& c2 = s.conv2;
    // The tile's real images (the last tile may be partial) and its rows of the global tensors.
    const int64_t first = tile_index * s.tile;
    const int images = tile_images(p.batch, first, s.tile);
    float* row = p.partials + tile_index * p.row_length;
    float* conv2_row = row + s.dense_columns;
    switch (phase) {
      case 0: stage(p, smem, tile_index, images, tid, threads); break;
      case 1:
        hidden_grads(p.fc3_w, s.f3, s.f2, smem + s.g3_at, p.fc2 + first * s.f2, s.tile, images, smem + s.g2_at,
                     p.g2 + first * s.f2, tid, threads);
        break;
      case 2:
        hidden_grads(p.fc2_w, s.f2, s.f1, smem + s.g2_at, p.fc1 + first * s.f1, s.tile, images, smem + s.g1_at,
                     p.g1 + first * s.f1, tid, threads);
        break;
      case 3: block2_grads_and_bias_sums(p, smem, row, tid, threads); break;
      case 4:
        if (p.conv2) conv_tile_phases::preactivation_grads(c2, smem + s.grad_block2_at, images, smem, tid, threads);
        break;
      case 5:
        if (p.conv2) {
          float* grad_block1 = p.grad_block1 ? p.grad_block1 + first * c2.in_channels * c2.height * c2.width : nullptr;
          conv_tile_phases::gradients(c2, smem, grad_block1, images, conv2_row, tid, threads);
        }
        break;
      default:
        if (p.conv2) conv_tile_phases::add_slices(c2, smem, conv2_row, tid, threads);
    }
  }
};

}  // namespace lenet_ext
