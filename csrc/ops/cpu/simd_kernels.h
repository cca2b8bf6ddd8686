// The vectorised float32 CPU kernels, one table per instruction set, and the
// choice among them. The kernels are in conv_sigmoid_avgpool2d_simd.h; each
// isa/*.cpp compiles them for one instruction set.
#pragma once

#include <cstdint>

#include "../conv_sigmoid_avgpool2d_math.h"

namespace lenet_ext {
namespace cpu {

struct SimdKernels {
  bool (*supported)(const ConvPoolGeometry& g);
  int64_t (*xp_size)(const ConvPoolGeometry& g);  // per-thread buffer sizes, in floats
  int64_t (*dz_size)(const ConvPoolGeometry& g);
  void (*forward_images)(const ConvPoolGeometry& g, const float* x, const float* packed_weights,
                         const float* packed_bias, float* out, int64_t n_begin, int64_t n_end,
                         float* xp);
  void (*backward_images)(const ConvPoolGeometry& g, const float* grad_out, const float* x,
                          const float* packed_weights, const float* packed_bias,
                          const float* weight, float* grad_x, float* grad_weight_lanes,
                          float* grad_bias_lanes, int64_t n_begin, int64_t n_end, float* xp,
                          float* dz);
  // Turns the weight-gradient lanes that backward_images accumulates
  // (C_out * C_in * K * K * 16 floats) into C_out * C_in * K * K sums.
  void (*sum_weight_lanes)(const ConvPoolGeometry& g, const float* lanes, float* out);
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
