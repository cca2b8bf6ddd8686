// lenet_backward for a batch of a few images in one pass, with no ATen call
// between the layers: the dense layers' backward in simd/dense.h, the conv
// blocks' in the vectorised kernels of simd/, every intermediate gradient
// in per-thread buffers. Threads, when free, share the images as the
// forward does; each sums its own parameter gradients, which are then added
// in thread order.
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <vector>

#include "lenet_small_batch.h"
#include "small_batch_state.h"

namespace lenet_ext {

namespace {

float* data_if(bool wanted, const at::Tensor& t) { return wanted ? t.mutable_data_ptr<float>() : nullptr; }

// Where one thread puts a dense layer's parameter gradients (nullptr: not
// asked for): the results for the first thread, its own sums for the others.
struct DenseSums {
  float *weight, *bias;
};

}  // namespace

std::optional<LeNetGrads> backward_small_batch(const at::Tensor& grad_logits_arg, const at::Tensor& x_arg,
                                               const LeNetActivations& saved, const LeNetParams& p,
                                               const LeNetGradMask& output_mask) {
  const cpu::SimdKernels* kernels = cpu::small_batch_kernels(x_arg);
  if (kernels == nullptr) return std::nullopt;
  const LeNetBackwardCall call = check_backward_args(grad_logits_arg, x_arg, saved, p, output_mask);
  const ConvPoolGeometry g[2] = {call.block1, call.block2};
  if (!kernels->supported(g[0]) || !kernels->supported(g[1])) return std::nullopt;
  const LeNetGradMask& mask = call.mask;
  const auto& below = call.needed_below;

  const at::Tensor x = x_arg.contiguous(), grad_logits = grad_logits_arg.contiguous();
  const at::Tensor block1 = saved.block1.contiguous(), block2 = saved.block2.contiguous();
  const at::Tensor fc1 = saved.fc1.contiguous(), fc2 = saved.fc2.contiguous();
  const at::Tensor conv_w[2] = {p.conv1_weight.contiguous(), p.conv2_weight.contiguous()};
  const at::Tensor fc_w[3] = {p.fc1_weight.contiguous(), p.fc2_weight.contiguous(), p.fc3_weight.contiguous()};
  const int64_t batch = x.size(0);
  // Each dense layer's input width; the last entry is fc3's output.
  const int64_t width[4] = {block2.size(1), fc_w[0].size(0), fc_w[1].size(0), fc_w[2].size(0)};

  LeNetGradArray grads;
  if (mask[kX]) grads[kX] = at::empty_like(x, at::MemoryFormat::Contiguous);
  for (int i = kConv1W; i < kGrads; ++i)
    if (mask[i]) grads[i] = at::empty_like(parameter(p, LeNetGrad(i)), at::MemoryFormat::Contiguous);

  // Per-thread state, sized before any thread starts.
  const int threads = cpu::small_batch_threads(batch);
  cpu::SmallBatchState& st = cpu::small_batch_state();
  const cpu::PackedWeights packed[2] = {st.conv1.get(conv_w[0], cpu::contiguous(p.conv1_bias)),
                                        st.conv2.get(conv_w[1], cpu::contiguous(p.conv2_bias))};
  const std::vector<float*> xp = st.padded_inputs(*kernels, g[0], g[1], threads);
  if (static_cast<int>(st.backward.size()) < threads) st.backward.resize(threads);
  const int64_t xp1_size = kernels->xp_size(g[0]), dz1_size = kernels->dz_size(g[0]);
  const int64_t weight_lanes[2] = {kernels->weight_lanes_size(g[0]), kernels->weight_lanes_size(g[1])};
  const int64_t bias_lanes[2] = {cpu::PackedWeights::blocks(g[0].out_channels) * cpu::kLanes,
                                 cpu::PackedWeights::blocks(g[1].out_channels) * cpu::kLanes};
  const int64_t dense_floats = width[1] * (width[0] + 1) + width[2] * (width[1] + 1) + width[3] * (width[2] + 1);
  std::vector<float*> dz(threads);
  std::vector<std::array<DenseSums, 3>> dense(threads);
  for (int t = 0; t < threads; ++t) {
    cpu::BackwardShare& share = st.backward[t];
    dz[t] = share.dz.get(g[0], g[1], dz1_size + kernels->dz_size(g[1]));
    for (int b = 0; b < 2; ++b) {
      cpu::sized(share.conv[b].weight_lanes, weight_lanes[b]);
      cpu::sized(share.conv[b].bias_lanes, bias_lanes[b]);
    }
    float* sums = t == 0 ? nullptr : cpu::sized(share.dense_grads, dense_floats);
    for (int l = 0; l < 3; ++l) {
      const LeNetGrad w = LeNetGrad(kFc1W + 2 * l), b = LeNetGrad(kFc1B + 2 * l);
      if (t == 0) {
        dense[t][l] = {data_if(mask[w], grads[w]), data_if(mask[b], grads[b])};
        continue;
      }
      dense[t][l] = {mask[w] ? sums : nullptr, mask[b] ? sums + width[l + 1] * width[l] : nullptr};
      sums += width[l + 1] * (width[l] + 1);
    }
  }
  // dL/dz of each dense layer below fc3 (its sigmoid's input), and the conv blocks' outputs.
  float* grad_z[2] = {cpu::sized(st.grad_fc1, batch * width[1]), cpu::sized(st.grad_fc2, batch * width[2])};
  float* grad_block[2] = {cpu::sized(st.grad_block1, block1.numel()), cpu::sized(st.grad_block2, batch * width[0])};
  const float* layer_in[3] = {block2.const_data_ptr<float>(), fc1.const_data_ptr<float>(), fc2.const_data_ptr<float>()};
  const float* conv_in[2] = {x.const_data_ptr<float>(), block1.const_data_ptr<float>()};

  cpu::for_each_thread_share(threads, batch, [&](int t, int64_t first, int64_t end) {
    // The dense layers from fc3 down, as far as a gradient below each is asked for.
    for (int l = 2; l >= 0; --l) {
      const int64_t in = width[l], out = width[l + 1];
      const float* grad_out = l == 2 ? grad_logits.const_data_ptr<float>() : grad_z[l];
      float* grad_in = l > 0 ? grad_z[l - 1] : grad_block[1];
      const bool chain_goes_on = below[kFc1W + 2 * l];
      kernels->dense_backward_rows({fc_w[l].const_data_ptr<float>(), in, out, layer_in[l] + first * in,
                                    grad_out + first * out, dense[t][l].weight, dense[t][l].bias,
                                    chain_goes_on ? grad_in + first * in : nullptr, /*in_is_sigmoid=*/l > 0},
                                   end - first);
      if (!chain_goes_on) return;
    }
    // Conv block 2, then block 1 when a gradient below block 2 is asked for.
    for (int b = 1; b >= 0; --b) {
      const LeNetGrad w = b == 1 ? kConv2W : kConv1W;
      cpu::BackwardShare::ConvSums& sums = st.backward[t].conv[b];
      if (mask[w]) std::fill_n(sums.weight_lanes.data(), weight_lanes[b], 0.0f);
      std::fill_n(sums.bias_lanes.data(), bias_lanes[b], 0.0f);
      float* grad_in = b == 1 ? (below[kConv2W] ? grad_block[0] : nullptr) : data_if(mask[kX], grads[kX]);
      kernels->backward_images(g[b],
                               {grad_block[b], conv_in[b], packed[b], conv_w[b].const_data_ptr<float>(), grad_in,
                                mask[w] ? sums.weight_lanes.data() : nullptr, sums.bias_lanes.data(),
                                xp[t] + b * xp1_size, dz[t] + b * dz1_size},
                               first, end);
      if (b == 1 && !below[kConv2W]) return;
    }
  });

  // The parameter gradients: the other threads' sums added to the first's, in thread order.
  const auto add = [](float* out, const float* sums, int64_t floats) {
    if (out)
      for (int64_t i = 0; i < floats; ++i) out[i] += sums[i];
  };
  for (int b = 0; b < 2; ++b) {
    const LeNetGrad w = b == 1 ? kConv2W : kConv1W, bias = b == 1 ? kConv2B : kConv1B;
    if (!below[b == 1 ? kFc1W : kConv2W]) continue;  // the block's backward did not run
    if (mask[w]) {
      float* out = grads[w].mutable_data_ptr<float>();
      kernels->sum_weight_lanes(g[b], st.backward[0].conv[b].weight_lanes.data(), out);
      float* sums = cpu::sized(st.thread_weight_grad, grads[w].numel());
      for (int t = 1; t < threads; ++t) {
        kernels->sum_weight_lanes(g[b], st.backward[t].conv[b].weight_lanes.data(), sums);
        add(out, sums, grads[w].numel());
      }
    }
    if (mask[bias]) {
      float* out = grads[bias].mutable_data_ptr<float>();
      std::copy_n(st.backward[0].conv[b].bias_lanes.data(), g[b].out_channels, out);
      for (int t = 1; t < threads; ++t) add(out, st.backward[t].conv[b].bias_lanes.data(), g[b].out_channels);
    }
  }
  for (int t = 1; t < threads; ++t) {
    for (int l = 0; l < 3; ++l) {
      add(dense[0][l].weight, dense[t][l].weight, width[l + 1] * width[l]);
      add(dense[0][l].bias, dense[t][l].bias, width[l + 1]);
    }
  }
  return as_tuple(grads);
}

}  // namespace lenet_ext
