// lenet_backward's dense weight gradients, dL/dW = g^T a for each of the
// three layers (g the gradient of the layer's output, (N, rows); a its
// input, (N, cols)), as one program where three matrix products took five
// launches: a thread sums 4 x 4 outputs over one split of the batch, in
// image order, into its split's row of partial sums, which the program of
// tile_partial_sums.h adds in a fixed order with the backward's other sums.
// The gradients are bitwise repeatable.
//
// Like the other tile programs, its phase is __host__ __device__ over the
// thread's coordinates: ../cuda/lenet_cuda.cu launches it, tile_emulation.cpp
// runs it on the CPU for the tests. float32 only.
#pragma once

#include <cstdint>

#include "tile_common.h"
#include "tile_partial_sums.h"  // range_holding

namespace lenet_ext {

// Outputs of a thread: a block of kWeightGradSide rows by kWeightGradSide columns.
constexpr int kWeightGradSide = 4;
static_assert(kWeightGradSide == 4, "a thread's floats of g and of a in an image are one load4");
constexpr int kMaxDenseLayers = 3;
// The batch is cut into as many splits as give each at least
// kMinImagesPerSplit images, up to kMaxWeightGradSplits: a split is only
// about 15 blocks (LeNet's 3,693 items over 256 threads), so a small batch
// needs many splits to occupy a GPU, and a thread's images run one after
// another; the cap keeps the partial sums a few megabytes.
constexpr int kMinImagesPerSplit = 16;
constexpr int kMaxWeightGradSplits = 32;

struct DenseWeightGrad {
  const float *g, *a;  // (N, rows) and (N, cols)
  int rows, cols;
  int column;          // where the layer's rows * cols sums start in a row of partials
  // Whether a thread's four floats of g (of a) in an image are one aligned
  // vector: rows (cols) a multiple of four and the tensor 16-byte aligned.
  bool g_vectors, a_vectors;
};

struct DenseWeightGradsParams {
  struct {
    int floats;  // shared memory: none
  } s;
  int64_t batch, images_per_split;
  int splits;                               // of the batch: rows of partials
  int count;                                // layers in use
  DenseWeightGrad layers[kMaxDenseLayers];
  int first_item[kMaxDenseLayers + 1];      // layer k's items: [first_item[k], first_item[k + 1])
  int blocks_per_split;
  int row_length;                           // of partials: every layer's rows * cols
  float* partials;                          // (splits, row_length)
};

LENET_HOST_DEVICE int weight_grad_blocks(int n) { return (n + kWeightGradSide - 1) / kWeightGradSide; }

// Host side: the parameters for these layers over a batch; the caller sets
// partials, (splits, row_length) floats.
inline DenseWeightGradsParams dense_weight_grads_params(const DenseWeightGrad* layers, int count, int64_t batch,
                                                        int threads) {
  DenseWeightGradsParams p{};
  p.count = count;
  p.batch = batch;
  p.first_item[0] = 0;
  int column = 0;
  const auto vectors = [](const float* data, int width) {
    return width % kWeightGradSide == 0 && reinterpret_cast<std::uintptr_t>(data) % (kWeightGradSide * sizeof(float)) == 0;
  };
  for (int k = 0; k < count; ++k) {
    p.layers[k] = layers[k];
    p.layers[k].column = column;
    p.layers[k].g_vectors = vectors(layers[k].g, layers[k].rows);
    p.layers[k].a_vectors = vectors(layers[k].a, layers[k].cols);
    column += layers[k].rows * layers[k].cols;
    p.first_item[k + 1] = p.first_item[k] + weight_grad_blocks(layers[k].rows) * weight_grad_blocks(layers[k].cols);
  }
  p.row_length = column;
  p.blocks_per_split = (p.first_item[count] + threads - 1) / threads;
  const int64_t wanted = (batch + kMinImagesPerSplit - 1) / kMinImagesPerSplit;
  p.splits = static_cast<int>(wanted < 1 ? 1 : wanted > kMaxWeightGradSplits ? kMaxWeightGradSplits : wanted);
  p.images_per_split = (batch + p.splits - 1) / p.splits;
  if (p.images_per_split > 0) p.splits = static_cast<int>((batch + p.images_per_split - 1) / p.images_per_split);
  return p;
}

// The program's blocks: none for default parameters (no layer asked for).
inline int64_t dense_weight_grads_blocks(const DenseWeightGradsParams& p) {
  return int64_t(p.splits) * p.blocks_per_split;
}

struct DenseWeightGradsProgram {
  using Params = DenseWeightGradsParams;
  static constexpr const char* kName = "DenseWeightGradsProgram";
  static constexpr int kPhases = 1;
  static constexpr const char* kPhaseNames[kPhases] = {"weight sums"};

  // Block b: split b / blocks_per_split, and its share of the items; an item
  // is one layer's block of 4 x 4 outputs, neighbouring threads taking
  // neighbouring row blocks: a warp reads the same floats of a and
  // consecutive floats of g, and a thread block a few columns of a, which
  // stay in L1 over its split's images.
  static LENET_HOST_DEVICE void run_phase(int, const Params& p, float*, int64_t block, int tid, int threads) {
    const int64_t split = block / p.blocks_per_split;
    const int item = static_cast<int>(block % p.blocks_per_split) * threads + tid;
    if (item >= p.first_item[p.count]) return;
    const int k = range_holding(p.first_item, p.count, item);
    const DenseWeightGrad& layer = p.layers[k];
    const int local = item - p.first_item[k], layer_row_blocks = weight_grad_blocks(layer.rows);
    const int r0 = local % layer_row_blocks * kWeightGradSide, c0 = local / layer_row_blocks * kWeightGradSide;
    const int64_t begin = split * p.images_per_split;
    const int64_t end = p.batch - begin < p.images_per_split ? p.batch : begin + p.images_per_split;
    float sum[kWeightGradSide][kWeightGradSide] = {};
#if defined(__CUDA_ARCH__)
#pragma unroll 4  // four images' loads in flight: each image's 16 FMAs are shorter than a load's wait
#endif
    for (int64_t n = begin; n < end; ++n) {
      float g[kWeightGradSide], a[kWeightGradSide];
      if (layer.g_vectors) {
        load4(layer.g + n * layer.rows + r0, g);
      } else {
        LENET_UNROLL
        for (int i = 0; i < kWeightGradSide; ++i) g[i] = r0 + i < layer.rows ? layer.g[n * layer.rows + r0 + i] : 0.0f;
      }
      if (layer.a_vectors) {
        load4(layer.a + n * layer.cols + c0, a);
      } else {
        LENET_UNROLL
        for (int i = 0; i < kWeightGradSide; ++i) a[i] = c0 + i < layer.cols ? layer.a[n * layer.cols + c0 + i] : 0.0f;
      }
      LENET_UNROLL
      for (int i = 0; i < kWeightGradSide; ++i) {
        LENET_UNROLL
        for (int j = 0; j < kWeightGradSide; ++j) sum[i][j] += g[i] * a[j];
      }
    }
    float* row = p.partials + split * p.row_length + layer.column;
    LENET_UNROLL
    for (int i = 0; i < kWeightGradSide; ++i) {
      LENET_UNROLL
      for (int j = 0; j < kWeightGradSide; ++j)
        if (r0 + i < layer.rows && c0 + j < layer.cols) row[(r0 + i) * layer.cols + c0 + j] = sum[i][j];
    }
  }
};

}  // namespace lenet_ext
