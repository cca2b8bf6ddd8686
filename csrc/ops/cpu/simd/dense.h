// A dense layer (Linear, optionally followed by a sigmoid) over a few rows:
// the small-batch inference path runs LeNet's three dense layers here instead
// of through ATen's addmm, whose dispatch and BLAS set-up cost more than the
// arithmetic at batch 1 (fc1 is 48,000 multiply-adds).
//
// Four output features at a time share each vector of the input row; the
// products run along the input features in vectors, with a scalar tail.
#pragma once

#include "vec.h"

namespace lenet_ext {
namespace cpu {
namespace LENET_ISA {

typedef float half_vec __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float quarter_vec __attribute__((vector_size(kLanes / 4 * sizeof(float))));

// The sum of v's lanes by halving: four dependent adds where a lane-by-lane
// loop would chain fifteen, on every output feature.
inline float lane_sum(vec v) {
  half_vec lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const half_vec h = lo + hi;
  quarter_vec qlo, qhi;
  std::memcpy(&qlo, &h, sizeof(qlo));
  std::memcpy(&qhi, reinterpret_cast<const char*>(&h) + sizeof(qlo), sizeof(qhi));
  const quarter_vec q = qlo + qhi;
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// out[j] = bias[j] + in . weight[j] for features j0 .. j0 + F - 1.
template <int F>
inline void dense_features(const DenseLayer& l, const float* in, int64_t j0, float* out) {
  const int64_t n = l.in_features;
  const int64_t whole = n / kLanes * kLanes;
  vec acc[F] = {};
  for (int64_t k = 0; k < whole; k += kLanes) {
    const vec x = load(in + k);
    for (int f = 0; f < F; ++f) acc[f] += x * load(l.weight + (j0 + f) * n + k);
  }
  for (int f = 0; f < F; ++f) {
    float sum = lane_sum(acc[f]);
    const float* row = l.weight + (j0 + f) * n;
    for (int64_t k = whole; k < n; ++k) sum += in[k] * row[k];
    out[j0 + f] = (l.bias ? l.bias[j0 + f] : 0.0f) + sum;
  }
}

// The layer over `rows` rows of in (in_features each) into out
// (out_features each).
inline void dense_rows(const DenseLayer& l, const float* in, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in_row = in + r * l.in_features;
    float* out_row = out + r * l.out_features;
    int64_t j = 0;
    for (; j + 4 <= l.out_features; j += 4) dense_features<4>(l, in_row, j, out_row);
    for (; j < l.out_features; ++j) dense_features<1>(l, in_row, j, out_row);
    if (!l.sigmoid) continue;
    // The vector sigmoid throughout, the tail through a vector of its own.
    int64_t i = 0;
    for (; i + kLanes <= l.out_features; i += kLanes) store(out_row + i, sigmoid_vec(load(out_row + i)));
    if (i < l.out_features) {
      float tail[kLanes] = {};
      std::memcpy(tail, out_row + i, (l.out_features - i) * sizeof(float));
      store(tail, sigmoid_vec(load(tail)));
      std::memcpy(out_row + i, tail, (l.out_features - i) * sizeof(float));
    }
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
