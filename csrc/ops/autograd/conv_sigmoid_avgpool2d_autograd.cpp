// conv_sigmoid_avgpool2d's autograd kernel, whose backward is
// conv_sigmoid_avgpool2d_backward. In C++ rather than through
// torch.library.register_autograd: its Python wrapper and the Python backward
// cost about a hundred microseconds a forward+backward, several times the
// kernels of a small batch on the CPU, and the host time of a block on a GPU.
//
// Saved: x and the parameters, nothing of the activation. nn.Sequential keeps
// x plus the sigmoid output (the input of the pool), which is C_out * H_conv *
// W_conv per image: six times x for LeNet's first layer. Backward recomputes
// z = conv(x) + bias instead. A backward that records a graph differentiates
// the block written with ATen's operators (differentiable_grads.h).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>

#include "differentiable_grads.h"

namespace lenet_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ConvSigmoidAvgPool2d : public torch::autograd::Function<ConvSigmoidAvgPool2d> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lenet_ext::conv_sigmoid_avgpool2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, int64_t, int64_t)>();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = op.call(x, weight, bias, padding, pool);
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor())});
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["pool"] = pool;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const int64_t padding = ctx->saved_data["padding"].toInt(), pool = ctx->saved_data["pool"].toInt();
    // needs_input_grad counts the tensor arguments that were given: x,
    // weight, then bias unless it was None.
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      bias.defined() && ctx->needs_input_grad(2)};
    std::array<at::Tensor, 3> grads;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const at::Tensor out = at::avg_pool2d(at::sigmoid(at::conv2d(x, weight, bias, 1, padding)), pool, pool);
      grads = differentiable_grads(out, std::array<at::Tensor, 3>{x, weight, bias}, mask, grad_out);
    } else {
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("lenet_ext::conv_sigmoid_avgpool2d_backward", "")
              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                  int64_t, int64_t, std::array<bool, 3>)>();
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const std::optional<at::Tensor> optional_bias = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
      std::tie(grads[0], grads[1], grads[2]) = op.call(grad_out, x, weight, optional_bias, padding, pool, mask);
    }
    // padding and pool get no gradient.
    return {grads[0], grads[1], grads[2], at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv_sigmoid_avgpool2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
  return ConvSigmoidAvgPool2d::apply(x, weight, bias, padding, pool);
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, Autograd, m) {
  m.impl("conv_sigmoid_avgpool2d", &conv_sigmoid_avgpool2d_autograd);
}

}  // namespace lenet_ext
