// Gradients that are themselves differentiable, for a backward that records a
// graph (create_graph=True): the fused backward operators have no derivative
// of their own, so the autograd kernels differentiate the same computation
// written with ATen's differentiable operators instead. `output` is that
// computation of `inputs`; an entry whose mask is false comes back undefined.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/autograd.h>

#include <array>
#include <cstddef>
#include <vector>

namespace lenet_ext {

template <std::size_t N>
std::array<at::Tensor, N> differentiable_grads(const at::Tensor& output, const std::array<at::Tensor, N>& inputs,
                                               const std::array<bool, N>& mask, const at::Tensor& grad_output) {
  std::vector<at::Tensor> wanted;
  for (std::size_t i = 0; i < N; ++i)
    if (mask[i]) wanted.push_back(inputs[i]);
  const torch::autograd::variable_list got = torch::autograd::grad(
      {output}, wanted, {grad_output}, /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
  std::array<at::Tensor, N> grads;
  for (std::size_t i = 0, k = 0; i < N; ++i)
    if (mask[i]) grads[i] = got[k++];
  return grads;
}

}  // namespace lenet_ext
