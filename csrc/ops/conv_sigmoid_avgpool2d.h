// The fused conv -> sigmoid -> avgpool operator, lenet_ext::conv_sigmoid_avgpool2d,
// and its backward: the host-side steps its CPU and CUDA launchers share.
// Argument checks run before any kernel, so that every device reports bad
// input the same way (lenet_ext/ops.py's fake kernels mirror them); then the
// tensors are prepared, and the per-chunk weight and bias gradients reduced.
//
//   schema and checks   conv_sigmoid_avgpool2d.cpp
//   per-element math    conv_sigmoid_avgpool2d_math.h
//   CUDA tile programs  tile/conv_sigmoid_avgpool2d_tile.h, tile/conv_sigmoid_avgpool2d_tile_backward.h
//   kernels             cpu/conv_sigmoid_avgpool2d_cpu.cpp, cuda/conv_sigmoid_avgpool2d_cuda.cu
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

#include "conv_sigmoid_avgpool2d_math.h"
#include "tile/conv_sigmoid_avgpool2d_tile.h"
#include "tile/tile_partial_sums.h"

namespace lenet_ext {

// What the argument checks read of a layer's input: a tensor's, or one that
// a fused caller has not made yet.
struct InputMeta {
  at::IntArrayRef sizes;
  at::ScalarType dtype;
  at::Device device;
};

inline InputMeta meta_of(const at::Tensor& x) { return {x.sizes(), x.scalar_type(), x.device()}; }

// An optional argument (a bias) made contiguous, or undefined when None.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}

// A float32 tensor's data for a kernel, null for an undefined one (a bias given as None).
inline const float* float_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

// Validates the forward arguments and returns the sizes of the call.
ConvPoolGeometry check_forward_args(
    const InputMeta& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool);

inline ConvPoolGeometry check_forward_args(
    const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
  return check_forward_args(meta_of(x), weight, bias, padding, pool);
}

// Validates the backward arguments (the forward ones plus grad_out).
ConvPoolGeometry check_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool);

// A checked forward call: its sizes, its tensors made contiguous (bias is
// undefined when None) and its allocated output.
struct ForwardCall {
  ConvPoolGeometry g;
  at::Tensor x, weight, bias, out;
};

ForwardCall prepare_forward(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool);

// A checked backward call, likewise, with the gradients asked for; grad_x is
// allocated when need_x. need_bias is false when bias is None.
struct BackwardCall {
  ConvPoolGeometry g;
  at::Tensor grad_out, x, weight, bias, grad_x;
  bool need_x, need_weight, need_bias;

  // Per-chunk sums of the weight and bias gradients, weight first:
  // (chunks, weight.numel() + C_out) in the accumulation dtype; zeroed unless
  // the caller writes every element.
  at::Tensor param_partials(int64_t chunks, bool zeroed = true) const;

  // Sums the chunks of `partials` and returns (grad_x, grad_weight, grad_bias);
  // an entry not asked for is undefined.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& partials) const;
};

// The sum over dim 0 of per-chunk partial sums, added in chunk order, so
// that the result does not depend on how the chunks were scheduled. The CPU
// kernels' and CUDA's reference kernels' reductions go through here (the
// CUDA tile programs' through tile/tile_partial_sums.h). On the CPU a plain loop:
// at::sum would open a parallel region for a few thousand numbers.
at::Tensor sum_partials(const at::Tensor& partials);

BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t padding, int64_t pool, std::array<bool, 3> output_mask);

// --- the tile programs (tile/conv_sigmoid_avgpool2d_tile.h) -----------------------

// Whether the tile programs take a call: float32, and 32-bit offsets inside a
// tile. Whether a tile fits a block's shared memory is the launcher's test.
bool conv_tile_program_fits(const ConvPoolGeometry& g, const at::Tensor& x);

// The forward program's parameters for a prepared call, `tile` images per block.
ConvTileForwardParams conv_tile_forward_params(const ForwardCall& call, int tile);

// The backward program's parameters for a prepared call, for blocks of
// `threads` threads, and the per-tile weight and bias sums it writes (one row
// per tile; call.finish adds them).
struct ConvTileBackward {
  int64_t tiles;
  at::Tensor partials;
  ConvTileBackwardParams params;
};
ConvTileBackward prepare_tile_backward(const BackwardCall& call, int tile, int threads);

// The passes of PartialSumsProgram (tile/tile_partial_sums.h) that add `sums`, to
// be launched in order over blocks[i] blocks: none without sums, one when no
// sum has more than kSumRowsPerBlock rows; each further pass adds the rows
// the one before wrote into scratch.
struct PartialSumsPlan {
  std::vector<PartialSumsParams> passes;
  std::vector<int64_t> blocks;
  std::vector<at::Tensor> scratch;
};
PartialSumsPlan plan_partial_sums(std::vector<ColumnSum> sums, const at::TensorOptions& options);

// The weight and bias gradients asked for, allocated, and the passes that
// add the backward program's rows into them: the tile programs' last step.
struct ConvTileSums {
  at::Tensor grad_weight, grad_bias;
  PartialSumsPlan plan;
};
ConvTileSums prepare_tile_sums(const BackwardCall& call, const ConvTileBackward& tiled);

}  // namespace lenet_ext
