// What lenet_small_batch.cpp's forwards and lenet_small_batch_backward.cpp's
// backward keep between calls, per calling thread: the conv weights packed
// for the vectorised kernels, the kernels' zero-bordered buffers, and
// buffers grown to the largest call seen.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "lenet_small_batch.h"
#include "simd/simd_kernels.h"

namespace lenet_ext {
namespace cpu {

// The vectorised kernels a call on x runs on the small-batch path, or
// nullptr when the path does not take it: not a 4-d float32 x, batch 0 or
// over kSmallBatch, or the generic kernels selected.
inline const SimdKernels* small_batch_kernels(const at::Tensor& x) {
  const SimdKernels* kernels = selected_kernels();
  const bool taken = kernels != nullptr && x.scalar_type() == at::kFloat && x.dim() == 4 && x.size(0) > 0 &&
                     x.size(0) <= kSmallBatch;
  return taken ? kernels : nullptr;
}

inline float* sized(std::vector<float>& buffer, int64_t floats) {
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

inline const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// A conv block's weights in the vectorised kernels' layout, with the values
// they were packed from. A call whose weight and bias hold the same values
// reuses them: compared by content, not by identity or version, so that no
// way of changing a parameter in place is missed. Comparing LeNet's 2,600
// values costs a fraction of packing them.
class PackedCache {
 public:
  PackedWeights get(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
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
    packed_.resize(PackedWeights::size(out_channels, per_channel));
    view_ = PackedWeights::pack(w, b, out_channels, per_channel, packed_.data());
    return view_;
  }

 private:
  std::vector<float> values_, packed_;
  int64_t out_channels_ = -1, per_channel_ = -1;
  bool has_bias_ = false;
  PackedWeights view_{};
};

// A thread's buffer for both conv blocks' xp (or dz), zeroed only when the
// sizes it was zeroed for change: the kernels leave the zero borders of xp
// and dz as they find them.
class ZeroedOnce {
 public:
  float* get(const ConvPoolGeometry& g1, const ConvPoolGeometry& g2, int64_t floats) {
    ConvPoolGeometry sizes[2] = {g1, g2};
    sizes[0].batch = sizes[1].batch = 0;  // not part of the buffers' layout
    if (!valid_ || static_cast<int64_t>(buffer_.size()) != floats ||
        std::memcmp(sizes, zeroed_for_, sizeof(sizes)) != 0) {
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

// One thread's share of a backward call: its dz buffer, and its own sums of
// the parameter gradients: per conv block the lanes backward_images adds
// to, and the dense layers' weight and bias gradients one after another
// (but for the first thread, whose go straight to the results).
struct BackwardShare {
  ZeroedOnce dz;
  struct ConvSums {
    std::vector<float> weight_lanes, bias_lanes;
  } conv[2];
  std::vector<float> dense_grads;
};

struct SmallBatchState {
  PackedCache conv1, conv2;
  std::vector<ZeroedOnce> xp;  // one per thread of the call
  std::vector<BackwardShare> backward;  // one per thread of the call
  std::vector<float> block1, block2, fc1, fc2;  // a forward's activations, when not kept
  std::vector<float> grad_fc1, grad_fc2, grad_block1, grad_block2;  // a backward's gradients between the layers
  std::vector<float> thread_weight_grad;  // one thread's conv weight gradient, summed from its lanes

  // Each of `threads` threads' xp buffer for both conv blocks, block 2's
  // kernels.xp_size(g1) floats on.
  std::vector<float*> padded_inputs(const SimdKernels& kernels, const ConvPoolGeometry& g1,
                                    const ConvPoolGeometry& g2, int threads) {
    if (static_cast<int>(xp.size()) < threads) xp.resize(threads);
    std::vector<float*> buffers(threads);
    for (int t = 0; t < threads; ++t) buffers[t] = xp[t].get(g1, g2, kernels.xp_size(g1) + kernels.xp_size(g2));
    return buffers;
  }
};

// The calling thread's state.
inline SmallBatchState& small_batch_state() {
  thread_local SmallBatchState state;
  return state;
}

// Threads for a call of `images` images, each with whole images: one image
// stays on one thread. Splitting its layers takes a barrier between each
// two, and when a machine has more runnable threads than cores, each
// barrier waits out a scheduler time slice. On two cores shared with ten
// busy processes, batch 1 on two threads took a median of 64 ms, on one
// 21 us; on idle cores two threads gain about 5 us.
inline int small_batch_threads(int64_t images) {
#ifdef _OPENMP
  if (!at::in_parallel_region()) return static_cast<int>(std::min<int64_t>(at::get_num_threads(), images));
#endif
  return 1;
}

// Calls fn(thread, first, end) on each of `threads` threads with its share
// of `images` whole images, [first, end): no thread reads what another
// writes. fn must not throw, so every check and allocation comes before.
template <typename Fn>
void for_each_thread_share(int threads, int64_t images, const Fn& fn) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int t = 0, n = 1;
#ifdef _OPENMP
    t = omp_get_thread_num(), n = omp_get_num_threads();
#endif
    fn(t, t * images / n, (t + 1) * images / n);
  }
}

}  // namespace cpu
}  // namespace lenet_ext
