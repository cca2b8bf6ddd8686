// The last step of a tiled backward: every parameter gradient is the sum of
// its column of per-tile partial sums, (tiles, row_length) in global memory.
// One program adds the columns of several such tensors at once, each into
// its own gradient: one launch for all of a backward's weights and biases.
//
// A block takes kSumColumns consecutive columns of one gradient and at most
// kSumRowsPerBlock rows, so that a warp reads whole lines of a row and the
// grid grows with the rows. A block's rows are split into kSumRowGroups fixed
// groups (row r in group r % kSumRowGroups), each added in row order, then
// the groups in group order. A sum with more rows than one block takes is
// added in passes: the first writes one row per block of rows into scratch
// memory, the next adds those rows (plan_partial_sums in
// ../conv_sigmoid_avgpool2d.h plans them). The order never depends on the block
// size or on scheduling, so the gradients are bitwise repeatable.
//
// Like the other tile programs, its phases are __host__ __device__ over the
// thread's coordinates: ../cuda/tile_program.cuh runs it, tile_emulation.cpp
// runs it on the CPU for the tests.
#pragma once

#include <cstdint>

#include "../conv_sigmoid_avgpool2d_math.h"

namespace lenet_ext {

constexpr int kSumColumns = 32;
constexpr int kSumRowGroups = 8;
constexpr int kSumRowsPerBlock = 512;
constexpr int kMaxColumnSums = 16;

// out[c] = the sum over r < rows of partials[r * row_length + column + c],
// for c < columns. With more than kSumRowsPerBlock rows, block of rows b
// writes its sums to out + b * out_row_length instead: a pass's output rows.
struct ColumnSum {
  const float* partials;
  int64_t rows;
  int row_length, column, columns;
  float* out;
  int out_row_length;
};

LENET_HOST_DEVICE int column_blocks(const ColumnSum& sum) { return (sum.columns + kSumColumns - 1) / kSumColumns; }

// At least one: a sum over no rows writes zeros.
LENET_HOST_DEVICE int64_t row_blocks(const ColumnSum& sum) {
  return sum.rows > kSumRowsPerBlock ? (sum.rows + kSumRowsPerBlock - 1) / kSumRowsPerBlock : 1;
}

// k such that first[k] <= item < first[k + 1], for an item below
// first[count]: which of a program's few ranges of blocks or items holds it.
template <typename Index>
LENET_HOST_DEVICE int range_holding(const Index* first, int count, Index item) {
  int k = 0;
  while (k + 1 < count && item >= first[k + 1]) ++k;
  return k;
}

struct PartialSumsParams {
  struct {
    int floats;  // shared memory: a value per (column, row group)
  } s;
  int count;                                // sums in use
  ColumnSum sums[kMaxColumnSums];
  int64_t first_block[kMaxColumnSums + 1];  // sum k takes blocks [first_block[k], first_block[k + 1])
};

// Host side: one pass's parameters for these sums, and its blocks
// (first_block[count]).
inline PartialSumsParams partial_sums_params(const ColumnSum* sums, int count) {
  PartialSumsParams p{};
  p.s.floats = kSumColumns * kSumRowGroups;
  p.count = count;
  p.first_block[0] = 0;
  for (int k = 0; k < count; ++k) {
    p.sums[k] = sums[k];
    p.first_block[k + 1] = p.first_block[k] + column_blocks(sums[k]) * row_blocks(sums[k]);
  }
  return p;
}

struct PartialSumsProgram {
  using Params = PartialSumsParams;
  static constexpr const char* kName = "PartialSumsProgram";
  static constexpr int kPhases = 2;
  static constexpr const char* kPhaseNames[kPhases] = {"row groups", "groups added"};

  // Phase 0: each (column, row group) item's sum over the block's rows into
  // shared memory; phase 1: the groups of each column added, into the
  // block's row of the output.
  static LENET_HOST_DEVICE void run_phase(int phase, const Params& p, float* smem, int64_t block, int tid,
                                          int threads) {
    const int k = range_holding(p.first_block, p.count, block);
    const ColumnSum& sum = p.sums[k];
    const int64_t local = block - p.first_block[k];
    const int64_t row_block = local / column_blocks(sum);
    const int first = static_cast<int>(local % column_blocks(sum)) * kSumColumns;
    if (phase == 0) {
      const int64_t begin = row_block * kSumRowsPerBlock;
      const int64_t end = sum.rows - begin < kSumRowsPerBlock ? sum.rows : begin + kSumRowsPerBlock;
      for (int item = tid; item < kSumColumns * kSumRowGroups; item += threads) {
        const int c = item % kSumColumns, group = item / kSumColumns;
        float total = 0.0f;
        if (first + c < sum.columns) {
          const float* column = sum.partials + sum.column + first + c;
          for (int64_t r = begin + group; r < end; r += kSumRowGroups) total += column[r * sum.row_length];
        }
        smem[item] = total;
      }
      return;
    }
    float* out = sum.out + row_block * sum.out_row_length;
    for (int c = tid; c < kSumColumns; c += threads) {
      if (first + c >= sum.columns) continue;
      float total = smem[c];
      for (int group = 1; group < kSumRowGroups; ++group) total += smem[group * kSumColumns + c];
      out[first + c] = total;
    }
  }
};

}  // namespace lenet_ext
