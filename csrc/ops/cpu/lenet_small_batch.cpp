#include "lenet_small_batch.h"

#include <ATen/ATen.h>

#include <vector>

#include "small_batch_state.h"

namespace lenet_ext {

LeNetActivations forward_small_batch(const at::Tensor& x_arg, const LeNetParams& p, bool keep_activations) {
  const char* op = keep_activations ? "lenet_train_forward" : "lenet_forward";
  const cpu::SimdKernels* kernels = cpu::small_batch_kernels(x_arg);
  if (kernels == nullptr) return {};
  const LeNetSizes sizes = check_lenet_args(x_arg, p, op);
  const ConvPoolGeometry &g1 = sizes.block1, &g2 = sizes.block2;
  const int64_t batch = g1.batch, f0 = g2.out_channels * g2.out_height * g2.out_width;
  if (!kernels->supported(g1) || !kernels->supported(g2)) return {};

  const at::Tensor x = x_arg.contiguous();
  const at::Tensor conv1_w = p.conv1_weight.contiguous(), conv2_w = p.conv2_weight.contiguous();
  const at::Tensor fc1_w = p.fc1_weight.contiguous(), fc2_w = p.fc2_weight.contiguous();
  const at::Tensor fc3_w = p.fc3_weight.contiguous();
  const std::optional<at::Tensor> conv1_b = cpu::contiguous(p.conv1_bias), conv2_b = cpu::contiguous(p.conv2_bias);
  const std::optional<at::Tensor> fc1_b = cpu::contiguous(p.fc1_bias), fc2_b = cpu::contiguous(p.fc2_bias);
  const std::optional<at::Tensor> fc3_b = cpu::contiguous(p.fc3_bias);
  const int64_t f1 = fc1_w.size(0), f2 = fc2_w.size(0), f3 = fc3_w.size(0);
  LeNetActivations out;
  out.logits = at::empty({batch, f3}, x.options());
  if (keep_activations) {  // the activations go to the tensors lenet_backward reads, not to this thread's buffers
    out.block1 = at::empty({batch, g1.out_channels, g1.out_height, g1.out_width}, x.options());
    out.block2 = at::empty({batch, f0}, x.options());
    out.fc1 = at::empty({batch, f1}, x.options());
    out.fc2 = at::empty({batch, f2}, x.options());
  }

  const int threads = cpu::small_batch_threads(batch);
  cpu::SmallBatchState& b = cpu::small_batch_state();
  const cpu::PackedWeights packed1 = b.conv1.get(conv1_w, conv1_b), packed2 = b.conv2.get(conv2_w, conv2_b);
  const std::vector<float*> xp = b.padded_inputs(*kernels, g1, g2, threads);
  const int64_t xp1_size = kernels->xp_size(g1);
  const auto activation = [&](const at::Tensor& kept, std::vector<float>& buffer, int64_t floats) {
    return kept.defined() ? kept.mutable_data_ptr<float>() : cpu::sized(buffer, floats);
  };
  float* block1_out = activation(out.block1, b.block1, batch * g1.out_channels * g1.out_height * g1.out_width);
  float* block2_out = activation(out.block2, b.block2, batch * f0);
  float* fc1_out = activation(out.fc1, b.fc1, batch * f1);
  float* fc2_out = activation(out.fc2, b.fc2, batch * f2);
  const cpu::DenseLayer fc1{fc1_w.const_data_ptr<float>(), cpu::data_or_null(fc1_b), f0, f1, true};
  const cpu::DenseLayer fc2{fc2_w.const_data_ptr<float>(), cpu::data_or_null(fc2_b), f1, f2, true};
  const cpu::DenseLayer fc3{fc3_w.const_data_ptr<float>(), cpu::data_or_null(fc3_b), f2, f3, false};
  const float* x_data = x.const_data_ptr<float>();
  float* logits_data = out.logits.mutable_data_ptr<float>();

  cpu::for_each_thread_share(threads, batch, [&](int t, int64_t first, int64_t end) {
    const int64_t rows = end - first;
    kernels->forward_images(g1, {x_data, packed1, block1_out, xp[t]}, first, end);
    kernels->forward_images(g2, {block1_out, packed2, block2_out, xp[t] + xp1_size}, first, end);
    kernels->dense_rows(fc1, block2_out + first * f0, rows, fc1_out + first * f1);
    kernels->dense_rows(fc2, fc1_out + first * f1, rows, fc2_out + first * f2);
    kernels->dense_rows(fc3, fc2_out + first * f2, rows, logits_data + first * f3);
  });
  return out;
}

}  // namespace lenet_ext
