// lenet_train_forward's autograd kernel: one graph node for the whole
// network, whose backward is lenet_backward. In C++ rather than through
// torch.library.register_autograd, whose Python wrapper re-reads the
// operator's sixteen-argument schema at every call: tens of microseconds,
// more than the kernels take at small batches on the CPU, and most of a
// training step's host time on a GPU.
//
// Saved: x, the parameters and the activations lenet_train_forward returns
// (the two conv blocks' outputs, the two hidden sigmoids), not the sigmoid
// outputs inside the conv blocks, which lenet_backward recomputes tile by
// tile. A backward that records a graph (create_graph=True) differentiates
// the same network written with ATen's differentiable operators instead,
// since lenet_backward has no derivative of its own.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../lenet.h"
#include "differentiable_grads.h"

namespace lenet_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Where each of lenet_backward's gradients (LeNetGrad order: x, then the ten
// parameters) sits among lenet_train_forward's fifteen arguments.
constexpr int kArguments = 15;
constexpr int kArgumentOf[kGrads] = {0, 1, 2, 5, 6, 9, 10, 11, 12, 13, 14};

// The saved variables: the four activations, then x and the parameters in
// LeNetGrad order (an absent bias saved as an undefined tensor).
constexpr int kSavedActivations = 4;

at::Tensor reference_forward(const std::array<at::Tensor, kGrads>& t, const std::array<int64_t, 4>& sizes) {
  const auto [padding1, pool1, padding2, pool2] = sizes;
  at::Tensor h = at::avg_pool2d(at::sigmoid(at::conv2d(t[kX], t[kConv1W], t[kConv1B], 1, padding1)), pool1, pool1);
  h = at::avg_pool2d(at::sigmoid(at::conv2d(h, t[kConv2W], t[kConv2B], 1, padding2)), pool2, pool2).flatten(1);
  h = at::sigmoid(at::linear(h, t[kFc1W], t[kFc1B]));
  h = at::sigmoid(at::linear(h, t[kFc2W], t[kFc2B]));
  return at::linear(h, t[kFc3W], t[kFc3B]);
}

class LeNetTrainForward : public torch::autograd::Function<LeNetTrainForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, LENET_PARAMS_ARGS) {
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("lenet_ext::lenet_train_forward", "")
                                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                    const at::Tensor&, LENET_PARAMS_ARGS)>();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [logits, block1, block2, fc1, fc2] =
        op.call(x, conv1_weight, conv1_bias, conv1_padding, pool1, conv2_weight, conv2_bias, conv2_padding, pool2,
                fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias);
    const auto or_undefined = [](const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); };
    ctx->save_for_backward({block1, block2, fc1, fc2, x, conv1_weight, or_undefined(conv1_bias), conv2_weight,
                            or_undefined(conv2_bias), fc1_weight, or_undefined(fc1_bias), fc2_weight,
                            or_undefined(fc2_bias), fc3_weight, or_undefined(fc3_bias)});
    ctx->saved_data["sizes"] = std::vector<int64_t>{conv1_padding, pool1, conv2_padding, pool2};
    ctx->mark_non_differentiable({block1, block2, fc1, fc2});
    // Backward reads only the logits' gradient: no zeros for the others.
    ctx->set_materialize_grads(false);
    return {logits, block1, block2, fc1, fc2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list result(kArguments);
    const at::Tensor& grad_logits = grad_outputs[0];
    if (!grad_logits.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    std::array<at::Tensor, kGrads> tensors;
    for (int i = 0; i < kGrads; ++i) tensors[i] = saved[kSavedActivations + i];
    const std::vector<int64_t> s = ctx->saved_data["sizes"].toIntVector();
    // needs_input_grad counts the tensor arguments that were given.
    LeNetGradMask mask{};
    for (int i = 0, edge = 0; i < kGrads; ++i)
      if (tensors[i].defined()) mask[i] = ctx->needs_input_grad(edge++);

    LeNetGradArray grads;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      grads = differentiable_grads(reference_forward(tensors, {s[0], s[1], s[2], s[3]}), tensors, mask, grad_logits);
    } else {
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("lenet_ext::lenet_backward", "")
              .typed<LeNetGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, LENET_PARAMS_ARGS, LeNetGradMask)>();
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
      const LeNetGrads g = op.call(grad_logits, tensors[kX], saved[0], saved[1], saved[2], saved[3],
                                   tensors[kConv1W], optional(tensors[kConv1B]), s[0], s[1], tensors[kConv2W],
                                   optional(tensors[kConv2B]), s[2], s[3], tensors[kFc1W], optional(tensors[kFc1B]),
                                   tensors[kFc2W], optional(tensors[kFc2B]), tensors[kFc3W],
                                   optional(tensors[kFc3B]), mask);
      grads = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g),  std::get<5>(g),
               std::get<6>(g), std::get<7>(g), std::get<8>(g), std::get<9>(g), std::get<10>(g)};
    }
    for (int i = 0; i < kGrads; ++i) result[kArgumentOf[i]] = grads[i];
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_train_forward_autograd(
    const at::Tensor& x, LENET_PARAMS_ARGS) {
  const variable_list out =
      LeNetTrainForward::apply(x, conv1_weight, conv1_bias, conv1_padding, pool1, conv2_weight, conv2_bias,
                               conv2_padding, pool2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, Autograd, m) {
  m.impl("lenet_train_forward", &lenet_train_forward_autograd);
}

}  // namespace lenet_ext
