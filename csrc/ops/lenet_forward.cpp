// The whole LeNet forward as one operator, for inference: one dispatch from
// Python instead of a dozen, which is most of the cost at batch 1. The conv
// blocks run the fused operator, the dense block addmm with an in-place
// sigmoid. It has no autograd formula: LeNet calls it only with gradients
// off, and a backward through it raises.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace lenet_ext {

namespace {

at::Tensor conv_block(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lenet_ext::conv_sigmoid_avgpool2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t, int64_t)>();
  return op.call(x, weight, bias, padding, pool);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* name) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), "lenet_forward: expected ", name,
                    " of shape (out_features, ", x.size(1), "), got ", weight.sizes());
  if (bias.has_value()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

at::Tensor lenet_forward(const at::Tensor& x, const at::Tensor& conv1_weight,
                         const std::optional<at::Tensor>& conv1_bias, int64_t conv1_padding,
                         int64_t pool1, const at::Tensor& conv2_weight,
                         const std::optional<at::Tensor>& conv2_bias, int64_t conv2_padding,
                         int64_t pool2, const at::Tensor& fc1_weight,
                         const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                         const std::optional<at::Tensor>& fc2_bias, const at::Tensor& fc3_weight,
                         const std::optional<at::Tensor>& fc3_bias) {
  at::Tensor h = conv_block(x, conv1_weight, conv1_bias, conv1_padding, pool1);
  h = conv_block(h, conv2_weight, conv2_bias, conv2_padding, pool2).flatten(1);
  h = linear(h, fc1_weight, fc1_bias, "fc1_weight").sigmoid_();
  h = linear(h, fc2_weight, fc2_bias, "fc2_weight").sigmoid_();
  return linear(h, fc3_weight, fc3_bias, "fc3_weight");
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CompositeExplicitAutograd, m) {
  m.impl("lenet_forward", &lenet_forward);
}

}  // namespace lenet_ext
