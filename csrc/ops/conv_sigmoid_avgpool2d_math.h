// Per-element arithmetic of the fused conv -> sigmoid -> avgpool operator.
//
// Every function here is __host__ __device__, and both the CPU and the CUDA
// kernels are built from them, so the CPU tests exercise exactly the index
// math and the arithmetic that the GPU runs.
//
// Layout: all tensors are contiguous NCHW (the launchers make them so).
//   x       (N, C_in, H, W)
//   weight  (C_out, C_in, K, K)
//   z       the pre-activation conv output, (N, C_out, H_conv, W_conv) with
//           H_conv = H + 2 * padding - K + 1 (stride 1)
//   out     (N, C_out, H_out, W_out) with H_out = H_conv / pool (floored)
// Only the conv outputs covered by a pooling window matter: the rows and
// columns that the floor drops get no gradient.
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__)
#define LENET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LENET_HOST_DEVICE inline
#endif

namespace lenet_ext {

// Sizes of one call, computed once by the launcher.
struct ConvPoolGeometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel, padding, pool;
  int64_t conv_height, conv_width;  // pre-pool conv output
  int64_t out_height, out_width;    // pooled output
};

LENET_HOST_DEVICE float exp_of(float v) { return expf(v); }
LENET_HOST_DEVICE double exp_of(double v) { return exp(v); }

template <typename acc_t>
LENET_HOST_DEVICE acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_of(-z));
}

// z at conv output (oh, ow) of one image and one output channel.
// x_image points at x[n], filter at weight[co]. Taps that fall into the zero
// padding are skipped.
template <typename scalar_t, typename acc_t>
LENET_HOST_DEVICE acc_t conv_preactivation(
    const scalar_t* x_image, const scalar_t* filter, acc_t bias,
    const ConvPoolGeometry& g, int64_t oh, int64_t ow) {
  acc_t z = bias;
  for (int64_t ci = 0; ci < g.in_channels; ++ci) {
    const scalar_t* x_plane = x_image + ci * g.height * g.width;
    const scalar_t* f_plane = filter + ci * g.kernel * g.kernel;
    for (int64_t kh = 0; kh < g.kernel; ++kh) {
      const int64_t ih = oh + kh - g.padding;
      if (ih < 0 || ih >= g.height) continue;
      for (int64_t kw = 0; kw < g.kernel; ++kw) {
        const int64_t iw = ow + kw - g.padding;
        if (iw < 0 || iw >= g.width) continue;
        z += acc_t(x_plane[ih * g.width + iw]) * acc_t(f_plane[kh * g.kernel + kw]);
      }
    }
  }
  return z;
}

// One pooled output: the mean of sigmoid(z) over its pool x pool window.
// z is consumed in registers and never stored.
template <typename scalar_t, typename acc_t>
LENET_HOST_DEVICE acc_t pooled_output(
    const scalar_t* x_image, const scalar_t* filter, acc_t bias,
    const ConvPoolGeometry& g, int64_t ph, int64_t pw) {
  acc_t sum = 0;
  for (int64_t dy = 0; dy < g.pool; ++dy) {
    for (int64_t dx = 0; dx < g.pool; ++dx) {
      sum += sigmoid(conv_preactivation(x_image, filter, bias, g,
                                        ph * g.pool + dy, pw * g.pool + dx));
    }
  }
  return sum / acc_t(g.pool * g.pool);
}

// dL/dz at conv output (oh, ow), recomputing z. grad_plane points at
// grad_out[n, co]. The average pool spreads each output gradient evenly over
// its window, and sigmoid'(z) = s * (1 - s).
template <typename scalar_t, typename acc_t>
LENET_HOST_DEVICE acc_t preactivation_grad(
    const scalar_t* grad_plane, const scalar_t* x_image,
    const scalar_t* filter, acc_t bias, const ConvPoolGeometry& g,
    int64_t oh, int64_t ow) {
  const int64_t ph = oh / g.pool;
  const int64_t pw = ow / g.pool;
  if (ph >= g.out_height || pw >= g.out_width) return acc_t(0);
  const acc_t s = sigmoid(conv_preactivation(x_image, filter, bias, g, oh, ow));
  const acc_t g_out = acc_t(grad_plane[ph * g.out_width + pw]);
  return g_out / acc_t(g.pool * g.pool) * s * (acc_t(1) - s);
}

// Extent of the conv output that the pool covers; dz outside it is zero.
LENET_HOST_DEVICE int64_t pooled_extent(int64_t out_size, int64_t pool) {
  return out_size * pool;
}

// dL/dx at input (ci, ih) -- a gather over every output that reads it.
// dz_image is dL/dz of one image, laid out (C_out, ext_h, ext_w) with
// ext = pooled_extent(...).
template <typename scalar_t, typename acc_t>
LENET_HOST_DEVICE acc_t input_grad(
    const acc_t* dz_image, const scalar_t* weight, const ConvPoolGeometry& g,
    int64_t ci, int64_t ih, int64_t iw) {
  const int64_t ext_h = pooled_extent(g.out_height, g.pool);
  const int64_t ext_w = pooled_extent(g.out_width, g.pool);
  acc_t sum = 0;
  for (int64_t co = 0; co < g.out_channels; ++co) {
    const acc_t* dz_plane = dz_image + co * ext_h * ext_w;
    const scalar_t* f_plane = weight + (co * g.in_channels + ci) * g.kernel * g.kernel;
    for (int64_t kh = 0; kh < g.kernel; ++kh) {
      const int64_t oh = ih + g.padding - kh;
      if (oh < 0 || oh >= ext_h) continue;
      for (int64_t kw = 0; kw < g.kernel; ++kw) {
        const int64_t ow = iw + g.padding - kw;
        if (ow < 0 || ow >= ext_w) continue;
        sum += dz_plane[oh * ext_w + ow] * acc_t(f_plane[kh * g.kernel + kw]);
      }
    }
  }
  return sum;
}

// One image's contribution to dL/dweight[co, ci, kh, kw].
template <typename scalar_t, typename acc_t>
LENET_HOST_DEVICE acc_t weight_grad(
    const acc_t* dz_image, const scalar_t* x_image, const ConvPoolGeometry& g,
    int64_t co, int64_t ci, int64_t kh, int64_t kw) {
  const int64_t ext_h = pooled_extent(g.out_height, g.pool);
  const int64_t ext_w = pooled_extent(g.out_width, g.pool);
  const acc_t* dz_plane = dz_image + co * ext_h * ext_w;
  const scalar_t* x_plane = x_image + ci * g.height * g.width;
  // Clip the output range to the rows and columns whose tap lands inside x.
  const int64_t oh_begin = g.padding - kh > 0 ? g.padding - kh : 0;
  const int64_t ow_begin = g.padding - kw > 0 ? g.padding - kw : 0;
  const int64_t oh_end = g.height + g.padding - kh < ext_h ? g.height + g.padding - kh : ext_h;
  const int64_t ow_end = g.width + g.padding - kw < ext_w ? g.width + g.padding - kw : ext_w;
  acc_t sum = 0;
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    const int64_t ih = oh + kh - g.padding;
    for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
      sum += dz_plane[oh * ext_w + ow] * acc_t(x_plane[ih * g.width + ow + kw - g.padding]);
    }
  }
  return sum;
}

// One image's contribution to dL/dbias[co].
template <typename acc_t>
LENET_HOST_DEVICE acc_t bias_grad(const acc_t* dz_image, const ConvPoolGeometry& g, int64_t co) {
  const int64_t plane = pooled_extent(g.out_height, g.pool) * pooled_extent(g.out_width, g.pool);
  const acc_t* dz_plane = dz_image + co * plane;
  acc_t sum = 0;
  for (int64_t i = 0; i < plane; ++i) sum += dz_plane[i];
  return sum;
}

}  // namespace lenet_ext
