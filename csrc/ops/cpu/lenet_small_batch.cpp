#include "lenet_small_batch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

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

// A thread's xp buffers of both conv blocks, zeroed only when the sizes they
// were zeroed for change: the kernels leave xp's zero border as they find it.
class PaddedInputs {
 public:
  float* get(const ConvPoolGeometry& g1, const ConvPoolGeometry& g2, int64_t xp1_size, int64_t xp2_size) {
    ConvPoolGeometry sizes[2] = {g1, g2};
    sizes[0].batch = sizes[1].batch = 0;  // not part of xp's layout
    const size_t floats = xp1_size + xp2_size;
    if (!valid_ || buffer_.size() != floats || std::memcmp(sizes, zeroed_for_, sizeof(sizes)) != 0) {
      buffer_.assign(floats, 0.0f);
      std::memcpy(zeroed_for_, sizes, sizeof(sizes));
      valid_ = true;
    }
    return buffer_.data();
  }

 private:
  std::vector<float> buffer_;
  ConvPoolGeometry zeroed_for_[2] = {};
  bool valid_ = false;
};

// Per-thread state, grown to the largest call seen and reused.
struct Buffers {
  PackedCache conv1, conv2;
  std::vector<PaddedInputs> xp;  // one per thread of the call
  std::vector<float> block1, block2, fc1, fc2;
};

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace

LeNetActivations forward_small_batch(const at::Tensor& x_arg, const LeNetParams& p, bool keep_activations) {
  const char* op = keep_activations ? "lenet_train_forward" : "lenet_forward";
  const cpu::SimdKernels* kernels = cpu::selected_kernels();
  if (kernels == nullptr || x_arg.scalar_type() != at::kFloat || x_arg.dim() != 4 || x_arg.size(0) == 0 ||
      x_arg.size(0) > kSmallBatch) {
    return {};
  }
  const LeNetSizes sizes = check_lenet_args(x_arg, p, op);
  const ConvPoolGeometry &g1 = sizes.block1, &g2 = sizes.block2;
  const int64_t batch = g1.batch, f0 = g2.out_channels * g2.out_height * g2.out_width;
  if (!kernels->supported(g1) || !kernels->supported(g2)) return {};

  const at::Tensor x = x_arg.contiguous();
  const at::Tensor conv1_w = p.conv1_weight.contiguous(), conv2_w = p.conv2_weight.contiguous();
  const at::Tensor fc1_w = p.fc1_weight.contiguous(), fc2_w = p.fc2_weight.contiguous();
  const at::Tensor fc3_w = p.fc3_weight.contiguous();
  const std::optional<at::Tensor> conv1_b = contiguous(p.conv1_bias), conv2_b = contiguous(p.conv2_bias);
  const std::optional<at::Tensor> fc1_b = contiguous(p.fc1_bias), fc2_b = contiguous(p.fc2_bias);
  const std::optional<at::Tensor> fc3_b = contiguous(p.fc3_bias);
  const int64_t f1 = fc1_w.size(0), f2 = fc2_w.size(0), f3 = fc3_w.size(0);
  LeNetActivations out;
  out.logits = at::empty({batch, f3}, x.options());
  if (keep_activations) {  // the activations go to the tensors lenet_backward reads, not to this thread's buffers
    out.block1 = at::empty({batch, g1.out_channels, g1.out_height, g1.out_width}, x.options());
    out.block2 = at::empty({batch, f0}, x.options());
    out.fc1 = at::empty({batch, f1}, x.options());
    out.fc2 = at::empty({batch, f2}, x.options());
  }

  // Threads when they are free, each with whole images. One image stays on
  // one thread: splitting its layers takes a barrier between each two, and
  // when a machine has more runnable threads than cores, each barrier waits
  // out a scheduler time slice. On two cores shared with ten busy processes,
  // batch 1 on two threads took a median of 64 ms, on one 21 us; on idle
  // cores two threads gain about 5 us.
  int threads = 1;
#ifdef _OPENMP
  if (!at::in_parallel_region()) threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), batch));
#endif

  thread_local Buffers buffers;
  Buffers& b = buffers;
  const cpu::PackedWeights packed1 = b.conv1.get(conv1_w, conv1_b), packed2 = b.conv2.get(conv2_w, conv2_b);
  if (static_cast<int>(b.xp.size()) < threads) b.xp.resize(threads);
  const int64_t xp1_size = kernels->xp_size(g1);
  std::vector<float*> xp(threads);
  for (int t = 0; t < threads; ++t) xp[t] = b.xp[t].get(g1, g2, xp1_size, kernels->xp_size(g2));
  const auto activation = [&](const at::Tensor& kept, std::vector<float>& buffer, int64_t floats) {
    return kept.defined() ? kept.mutable_data_ptr<float>() : sized(buffer, floats);
  };
  float* block1_out = activation(out.block1, b.block1, batch * g1.out_channels * g1.out_height * g1.out_width);
  float* block2_out = activation(out.block2, b.block2, batch * f0);
  float* fc1_out = activation(out.fc1, b.fc1, batch * f1);
  float* fc2_out = activation(out.fc2, b.fc2, batch * f2);
  const cpu::DenseLayer fc1{fc1_w.const_data_ptr<float>(), data_or_null(fc1_b), f0, f1, true};
  const cpu::DenseLayer fc2{fc2_w.const_data_ptr<float>(), data_or_null(fc2_b), f1, f2, true};
  const cpu::DenseLayer fc3{fc3_w.const_data_ptr<float>(), data_or_null(fc3_b), f2, f3, false};
  const float* x_data = x.const_data_ptr<float>();
  float* logits_data = out.logits.mutable_data_ptr<float>();

  // Nothing below throws: every check and allocation is above.
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int t = 0, n = 1;
#ifdef _OPENMP
    t = omp_get_thread_num(), n = omp_get_num_threads();
#endif
    // This thread's images: no thread reads what another writes.
    const int64_t first = t * batch / n, end = (t + 1) * batch / n, rows = end - first;
    kernels->forward_images(g1, {x_data, packed1, block1_out, xp[t]}, first, end);
    kernels->forward_images(g2, {block1_out, packed2, block2_out, xp[t] + xp1_size}, first, end);
    kernels->dense_rows(fc1, block2_out + first * f0, rows, fc1_out + first * f1);
    kernels->dense_rows(fc2, fc1_out + first * f1, rows, fc2_out + first * f2);
    kernels->dense_rows(fc3, fc2_out + first * f2, rows, logits_data + first * f3);
  }
  return out;
}

}  // namespace lenet_ext
