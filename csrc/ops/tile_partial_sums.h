// The last step of a tiled backward: every parameter gradient is the sum of
// its column of per-tile partial sums, (tiles, row_length) in global memory.
// One program adds the columns of several such tensors at once, each into
// its own gradient: one launch for all of a backward's weights and biases.
//
// A block takes kSumColumns consecutive columns of one gradient, so that a
// warp reads whole lines of a row. The rows are split into kSumRowGroups
// fixed groups (row r in group r % kSumRowGroups), each added in row order,
// then the groups in group order: the sum does not depend on the block size
// or on scheduling, so the gradients are bitwise repeatable.
//
// Like the other tile programs, its phases are __host__ __device__ over the
// thread's coordinates: cuda/tile_program.cuh runs it, tile_emulation.cpp
// runs it on the CPU for the tests.
#pragma once

#include <cstdint>

#include "conv_sigmoid_avgpool2d_math.h"

namespace lenet_ext {

constexpr int kSumColumns = 32;
constexpr int kSumRowGroups = 8;
constexpr int kMaxColumnSums = 8;

// out[c] = the sum over r < rows of partials[r * row_length + column + c],
// for c < columns.
struct ColumnSum {
  const float* partials;
  int64_t rows;
  int row_length, column, columns;
  float* out;
};

struct PartialSumsParams {
  struct {
    int floats;  // shared memory: a value per (column, row group)
  } s;
  int count;                                // sums in use
  ColumnSum sums[kMaxColumnSums];
  int first_block[kMaxColumnSums + 1];      // sum k takes blocks [first_block[k], first_block[k + 1])
};

// Host side: the program's parameters for these sums, and its blocks
// (first_block[count]).
inline PartialSumsParams partial_sums_params(const ColumnSum* sums, int count) {
  PartialSumsParams p{};
  p.s.floats = kSumColumns * kSumRowGroups;
  p.count = count;
  p.first_block[0] = 0;
  for (int k = 0; k < count; ++k) {
    p.sums[k] = sums[k];
    p.first_block[k + 1] = p.first_block[k] + (sums[k].columns + kSumColumns - 1) / kSumColumns;
  }
  return p;
}

struct PartialSumsProgram {
  using Params = PartialSumsParams;
  static constexpr int kPhases = 2;

  // Phase 0: each (column, row group) item's sum into shared memory; phase
  // 1: the groups of each column added, into the gradient.
  static LENET_HOST_DEVICE void run_phase(int phase, const Params& p, float* smem, int64_t block, int tid,
                                          int threads) {
    int k = 0;
    while (k + 1 < p.count && block >= p.first_block[k + 1]) ++k;
    const ColumnSum& sum = p.sums[k];
    const int first = static_cast<int>(block - p.first_block[k]) * kSumColumns;
    if (phase == 0) {
      for (int item = tid; item < kSumColumns * kSumRowGroups; item += threads) {
        const int c = item % kSumColumns, group = item / kSumColumns;
        float total = 0.0f;
        if (first + c < sum.columns) {
          const float* column = sum.partials + sum.column + first + c;
          for (int64_t r = group; r < sum.rows; r += kSumRowGroups) total += column[r * sum.row_length];
        }
        smem[item] = total;
      }
      return;
    }
    for (int c = tid; c < kSumColumns; c += threads) {
      if (first + c >= sum.columns) continue;
      float total = smem[c];
      for (int group = 1; group < kSumRowGroups; ++group) total += smem[group * kSumColumns + c];
      sum.out[first + c] = total;
    }
  }
};

}  // namespace lenet_ext
