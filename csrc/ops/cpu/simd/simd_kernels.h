// The vectorised float32 CPU kernels: one table of entry points per
// instruction set, and the choice among them.
//
//   the kernels         entry_points.h, built from vec.h, workspace.h, conv.h,
//                       forward.h, dz.h, weight_grad.h, input_grad.h, transpose.h,
//                       dense.h
//   one build per ISA   baseline.cpp, avx2.cpp, avx512.cpp
//   the choice          select.cpp
#pragma once

#include <cstdint>

#include "../../conv_sigmoid_avgpool2d_math.h"
#include "packed_weights.h"

namespace lenet_ext {
namespace cpu {

// A forward call's data: images n_begin .. n_end of x into out. xp is a
// per-thread buffer of xp_size() floats, zeroed once.
struct ForwardImages {
  const float* x;
  PackedWeights packed;
  float* out;
  float* xp;
};

// A backward call's data. grad_x (or nullptr) gets the input gradient of the
// call's images; grad_weight_lanes (or nullptr: not asked for) and
// grad_bias_lanes accumulate across calls, lanes unsummed (see
// sum_weight_lanes). weight is the unpacked (C_out, C_in, K, K) weight, which
// the input gradient reads. xp and dz are per-thread buffers of xp_size()
// and dz_size() floats, zeroed once; grad_weight_lanes has weight_lanes_size()
// floats.
struct BackwardImages {
  const float* grad_out;
  const float* x;
  PackedWeights packed;
  const float* weight;
  float* grad_x;
  float* grad_weight_lanes;
  float* grad_bias_lanes;
  float* xp;
  float* dz;
};

// A dense layer: out = in . weight^T + bias, then the sigmoid when `sigmoid`.
struct DenseLayer {
  const float* weight;  // (out_features, in_features)
  const float* bias;    // out_features, or nullptr
  int64_t in_features, out_features;
  bool sigmoid;
};

// A dense layer's backward over a few contiguous rows. grad_z is dL/dz for
// z = in . weight^T + bias (for a layer with a sigmoid, already through it).
// Gradients not asked for are nullptr. grad_in gets grad_z . weight, times
// in * (1 - in) when in_is_sigmoid (in is then the sigmoid output of the
// layer below, so that grad_in is that layer's dL/dz).
struct DenseBackward {
  const float* weight;  // (out_features, in_features)
  int64_t in_features, out_features;
  const float* in;       // rows x in_features
  const float* grad_z;   // rows x out_features
  float* grad_weight;    // out_features x in_features
  float* grad_bias;      // out_features
  float* grad_in;        // rows x in_features
  bool in_is_sigmoid;
};

struct SimdKernels {
  bool (*supported)(const ConvPoolGeometry& g);
  int64_t (*xp_size)(const ConvPoolGeometry& g);  // per-thread buffer sizes, in floats
  int64_t (*dz_size)(const ConvPoolGeometry& g);
  // The floats of the weight-gradient lanes that backward_images accumulates.
  int64_t (*weight_lanes_size)(const ConvPoolGeometry& g);
  void (*forward_images)(const ConvPoolGeometry& g, const ForwardImages& call, int64_t n_begin, int64_t n_end);
  void (*backward_images)(const ConvPoolGeometry& g, const BackwardImages& call, int64_t n_begin,
                          int64_t n_end);
  // Turns the weight-gradient lanes that backward_images accumulates
  // (weight_lanes_size floats) into C_out * C_in * K * K sums.
  void (*sum_weight_lanes)(const ConvPoolGeometry& g, const float* lanes, float* out);
  // A dense layer over `rows` contiguous rows of in into contiguous rows of out.
  void (*dense_rows)(const DenseLayer& layer, const float* in, int64_t rows, float* out);
  // The backward of a dense layer over `rows` (>= 1) rows, writing the
  // weight and bias gradients of their sum over the rows.
  void (*dense_backward_rows)(const DenseBackward& call, int64_t rows);
};

namespace baseline { extern const SimdKernels kernels; }
#if defined(__x86_64__)
namespace avx2 { extern const SimdKernels kernels; }
namespace avx512 { extern const SimdKernels kernels; }
#endif

// The kernels float32 calls run on, or nullptr for the generic scalar path.
// LENET_EXT_CPU_KERNEL, read once, picks one: generic, baseline, avx2,
// avx512, or auto (the default: the widest this CPU supports, capped by
// ATEN_CPU_CAPABILITY as ATen's own kernels are).
const SimdKernels* selected_kernels();

// The name of what selected_kernels() returns ("generic" for nullptr).
const char* selected_kernel_name();

// Switches every later call to the kernels `name` picks, with the same names
// and checks as LENET_EXT_CPU_KERNEL (lenet_ext._C.set_cpu_kernel, for tests).
void select_kernel(const char* name);

}  // namespace cpu
}  // namespace lenet_ext
