#include "lenet_small_batch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd/simd_kernels.h"

namespace lenet_ext {

namespace {

float* sized(std::vector<float>& buffer, int64_t floats) {
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// A conv block's weights in the vectorised kernels' layout, with the values
// they were packed from. A call whose weight and bias hold the same values
// reuses them: compared by content, not by identity or version, so that no
// way of changing a parameter in place is missed. Comparing LeNet's 2,600
// values costs a fraction of packing them.
class PackedCache {
 public:
  cpu::PackedWeights get(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    const int64_t out_channels = weight.size(0), per_channel = weight.numel() / out_channels;
    const float* w = weight.const_data_ptr<float>();
    const float* b = data_or_null(bias);
    const size_t weight_bytes = weight.numel() * sizeof(float), bias_bytes = out_channels * sizeof(float);
    const bool same = out_channels_ == out_channels && per_channel_ == per_channel && has_bias_ == (b != nullptr) &&
                      std::memcmp(values_.data(), w, weight_bytes) == 0 &&
                      (b == nullptr || std::memcmp(values_.data() + weight.numel(), b, bias_bytes) == 0);
    if (same) return view_;
    values_.assign(w, w + weight.numel());
    if (b) values_.insert(values_.end(), b, b + out_channels);
    out_channels_ = out_channels, per_channel_ = per_channel, has_bias_ = b != nullptr;
    packed_.resize(cpu::PackedWeights::size(out_channels, per_channel));
    view_ = cpu::PackedWeights::pack(w, b, out_channels, per_channel, packed_.data());
    return view_;
  }

 private:
  std::vector<float> values_, packed_;
  int64_t out_channels_ = -1, per_channel_ = -1;
  bool has_bias_ = false;
  cpu::PackedWeights view_{};
};

// Per-thread state, grown to the largest call seen and reused.
struct Buffers {
  PackedCache conv1, conv2;
  std::vector<float> xp1, xp2, block1, block2, fc1, fc2;
};

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace

at::Tensor forward_small_batch(const at::Tensor& x_arg, const LeNetParams& p) {
  constexpr const char* op = "lenet_forward";
  const cpu::SimdKernels* kernels = cpu::selected_kernels();
  if (kernels == nullptr || x_arg.scalar_type() != at::kFloat || x_arg.dim() != 4 || x_arg.size(0) == 0 ||
      x_arg.size(0) > kSmallBatch) {
    return at::Tensor();
  }
  // The checks of the layer-by-layer path, on the sizes each layer's input will have.
  const ConvPoolGeometry g1 = check_forward_args(x_arg, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1);
  const int64_t batch = g1.batch;
  const int64_t block1_sizes[] = {batch, g1.out_channels, g1.out_height, g1.out_width};
  const InputMeta block1{block1_sizes, x_arg.scalar_type(), x_arg.device()};
  const ConvPoolGeometry g2 = check_forward_args(block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2);
  const int64_t f0 = g2.out_channels * g2.out_height * g2.out_width;
  const int64_t dense_in[][2] = {{batch, f0}, {batch, p.fc1_weight.size(0)}, {batch, p.fc2_weight.size(0)}};
  check_linear({dense_in[0], block1.dtype, block1.device}, p.fc1_weight, p.fc1_bias, op, "fc1");
  check_linear({dense_in[1], block1.dtype, block1.device}, p.fc2_weight, p.fc2_bias, op, "fc2");
  check_linear({dense_in[2], block1.dtype, block1.device}, p.fc3_weight, p.fc3_bias, op, "fc3");
  if (!kernels->supported(g1) || !kernels->supported(g2)) return at::Tensor();

  const at::Tensor x = x_arg.contiguous();
  const at::Tensor conv1_w = p.conv1_weight.contiguous(), conv2_w = p.conv2_weight.contiguous();
  const at::Tensor fc1_w = p.fc1_weight.contiguous(), fc2_w = p.fc2_weight.contiguous();
  const at::Tensor fc3_w = p.fc3_weight.contiguous();
  const std::optional<at::Tensor> conv1_b = contiguous(p.conv1_bias), conv2_b = contiguous(p.conv2_bias);
  const std::optional<at::Tensor> fc1_b = contiguous(p.fc1_bias), fc2_b = contiguous(p.fc2_bias);
  const std::optional<at::Tensor> fc3_b = contiguous(p.fc3_bias);
  const int64_t f1 = fc1_w.size(0), f2 = fc2_w.size(0), f3 = fc3_w.size(0);
  at::Tensor logits = at::empty({batch, f3}, x.options());

  thread_local Buffers buffers;
  Buffers& b = buffers;
  // The kernels leave xp's zero border as they find it; another call's sizes
  // may have put data there.
  float* xp1 = sized(b.xp1, kernels->xp_size(g1));
  float* xp2 = sized(b.xp2, kernels->xp_size(g2));
  std::fill_n(xp1, kernels->xp_size(g1), 0.0f);
  std::fill_n(xp2, kernels->xp_size(g2), 0.0f);
  float* block1_out = sized(b.block1, batch * g1.out_channels * g1.out_height * g1.out_width);
  float* block2_out = sized(b.block2, batch * f0);
  kernels->forward_images(g1, {x.const_data_ptr<float>(), b.conv1.get(conv1_w, conv1_b), block1_out, xp1}, 0,
                          batch);
  kernels->forward_images(g2, {block1_out, b.conv2.get(conv2_w, conv2_b), block2_out, xp2}, 0, batch);
  float* fc1_out = sized(b.fc1, batch * f1);
  float* fc2_out = sized(b.fc2, batch * f2);
  kernels->dense_rows({fc1_w.const_data_ptr<float>(), data_or_null(fc1_b), f0, f1, true}, block2_out, batch, fc1_out);
  kernels->dense_rows({fc2_w.const_data_ptr<float>(), data_or_null(fc2_b), f1, f2, true}, fc1_out, batch, fc2_out);
  kernels->dense_rows({fc3_w.const_data_ptr<float>(), data_or_null(fc3_b), f2, f3, false}, fc2_out, batch,
                      logits.mutable_data_ptr<float>());
  return logits;
}

}  // namespace lenet_ext
