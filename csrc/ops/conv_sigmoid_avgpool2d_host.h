// Host-side steps shared by the CPU and CUDA launchers: argument checks, which
// run before any kernel so that every device reports bad input the same way,
// and the final reduction of the per-chunk weight and bias gradients.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "conv_sigmoid_avgpool2d.h"

namespace lenet_ext {

// Validates the forward arguments and returns the sizes of the call.
ConvPoolGeometry check_forward_args(
    const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool);

// Validates the backward arguments (the forward ones plus grad_out).
ConvPoolGeometry check_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool);

// The backward kernels accumulate weight and bias gradients per chunk of the
// batch into `partials` (chunks, weight.numel() + C_out), weight first. This
// sums the chunks and returns (grad_weight, grad_bias) in weight's dtype; an
// entry is undefined where it was not asked for.
std::tuple<at::Tensor, at::Tensor> reduce_param_grads(
    const at::Tensor& partials, const at::Tensor& weight, bool need_weight, bool need_bias);

}  // namespace lenet_ext
