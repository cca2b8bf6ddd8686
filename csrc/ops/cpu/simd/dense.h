// A dense layer (Linear, optionally followed by a sigmoid) over a few rows,
// and its backward: the small-batch paths run LeNet's three dense layers here
// instead of through ATen's addmm and mm, whose dispatch and BLAS set-up cost
// more than the arithmetic at batch 1 (fc1 is 48,000 multiply-adds).
//
// Blocks of four rows and four output features share their loads; the
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

// out[r][j] = bias[j] + in[r] . weight[j] for R rows and features j0 .. j0 + F - 1:
// each weight vector loaded serves R rows, each input vector F features.
template <int R, int F>
inline void dense_block(const DenseLayer& l, const float* in, int64_t j0, float* out) {
  const int64_t n = l.in_features;
  const int64_t whole = n / kLanes * kLanes;
  vec acc[R][F] = {};
  for (int64_t k = 0; k < whole; k += kLanes) {
    vec x[R];
    for (int r = 0; r < R; ++r) x[r] = load(in + r * n + k);
    for (int f = 0; f < F; ++f) {
      const vec w = load(l.weight + (j0 + f) * n + k);
      for (int r = 0; r < R; ++r) acc[r][f] += x[r] * w;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int f = 0; f < F; ++f) {
      float sum = lane_sum(acc[r][f]);
      const float* row = l.weight + (j0 + f) * n;
      for (int64_t k = whole; k < n; ++k) sum += in[r * n + k] * row[k];
      out[r * l.out_features + j0 + f] = (l.bias ? l.bias[j0 + f] : 0.0f) + sum;
    }
  }
}

// All features of R rows, four at a time.
template <int R>
inline void dense_block_rows(const DenseLayer& l, const float* in, float* out) {
  int64_t j = 0;
  for (; j + 4 <= l.out_features; j += 4) dense_block<R, 4>(l, in, j, out);
  for (; j < l.out_features; ++j) dense_block<R, 1>(l, in, j, out);
}

inline void sigmoid_row(float* row, int64_t size) {
  // The vector sigmoid throughout, the tail through a partial vector.
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) store(row + i, sigmoid_vec(load(row + i)));
  if (i < size) store_first(row + i, sigmoid_vec(load_first(row + i, size - i)), size - i);
}

// The layer over `rows` rows of in (in_features each) into out
// (out_features each), four rows at a time.
inline void dense_rows(const DenseLayer& l, const float* in, int64_t rows, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dense_block_rows<4>(l, in + r * l.in_features, out + r * l.out_features);
  for (; r < rows; ++r) dense_block_rows<1>(l, in + r * l.in_features, out + r * l.out_features);
  if (l.sigmoid)
    for (r = 0; r < rows; ++r) sigmoid_row(out + r * l.out_features, l.out_features);
}

// A part of a row: the first `count` (<= kLanes) floats, the rest zero.
inline vec load_part(const float* p, int64_t count) { return count == kLanes ? load(p) : load_first(p, count); }
inline void store_part(float* p, vec v, int64_t count) {
  if (count == kLanes)
    store(p, v);
  else
    store_first(p, v, count);
}

// The weight and bias gradients of R rows, written or added: each input
// vector of a row is loaded once per output feature, for all R rows' terms.
template <int R>
inline void dense_param_grads(const DenseBackward& c, const float* in, const float* grad_z, bool accumulate) {
  const int64_t n = c.in_features, m = c.out_features;
  for (int64_t j = 0; j < m; ++j) {
    float g[R];
    for (int r = 0; r < R; ++r) g[r] = grad_z[r * m + j];
    if (c.grad_bias) {
      float b = accumulate ? c.grad_bias[j] : 0.0f;
      for (int r = 0; r < R; ++r) b += g[r];
      c.grad_bias[j] = b;
    }
    if (!c.grad_weight) continue;
    float* row = c.grad_weight + j * n;
    for (int64_t k = 0; k < n; k += kLanes) {
      const int64_t count = n - k < kLanes ? n - k : kLanes;
      vec acc = accumulate ? load_part(row + k, count) : vec{};
      for (int r = 0; r < R; ++r) acc += splat(g[r]) * load_part(in + r * n + k, count);
      store_part(row + k, acc, count);
    }
  }
}

// dL/din of R rows: lanes are 16 input features, each weight vector loaded
// serves the R rows.
template <int R>
inline void dense_input_grad(const DenseBackward& c, const float* in, const float* grad_z, float* grad_in) {
  const int64_t n = c.in_features, m = c.out_features;
  for (int64_t k = 0; k < n; k += kLanes) {
    const int64_t count = n - k < kLanes ? n - k : kLanes;
    vec acc[R] = {};
    for (int64_t j = 0; j < m; ++j) {
      const vec w = load_part(c.weight + j * n + k, count);
      for (int r = 0; r < R; ++r) acc[r] += splat(grad_z[r * m + j]) * w;
    }
    for (int r = 0; r < R; ++r) {
      vec v = acc[r];
      if (c.in_is_sigmoid) {
        const vec s = load_part(in + r * n + k, count);
        v = v * (1.0f - s) * s;  // as ATen's sigmoid_backward orders it
      }
      store_part(grad_in + r * n + k, v, count);
    }
  }
}

// The layer's backward over `rows` (>= 1) rows, four at a time: the first
// block writes the parameter gradients, the others add to them.
inline void dense_backward_rows(const DenseBackward& c, int64_t rows) {
  const int64_t n = c.in_features, m = c.out_features;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    dense_param_grads<4>(c, c.in + r * n, c.grad_z + r * m, r > 0);
    if (c.grad_in) dense_input_grad<4>(c, c.in + r * n, c.grad_z + r * m, c.grad_in + r * n);
  }
  for (; r < rows; ++r) {
    dense_param_grads<1>(c, c.in + r * n, c.grad_z + r * m, r > 0);
    if (c.grad_in) dense_input_grad<1>(c, c.in + r * n, c.grad_z + r * m, c.grad_in + r * n);
  }
}

}  // namespace LENET_ISA
}  // namespace cpu
}  // namespace lenet_ext
