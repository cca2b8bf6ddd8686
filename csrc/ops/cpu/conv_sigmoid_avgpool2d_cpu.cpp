// CPU kernels of the fused conv -> sigmoid -> avgpool operator.
//
// float32 runs the vectorised kernels of simd/, built per instruction set and
// chosen at run time (simd/simd_kernels.h). float64, and
// float32 under LENET_EXT_CPU_KERNEL=generic, run the generic kernels below,
// made of the per-element math in ../conv_sigmoid_avgpool2d_math.h that the CUDA
// kernels share.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../conv_sigmoid_avgpool2d_math.h"
#include "../conv_sigmoid_avgpool2d.h"
#include "parallel.h"
#include "simd/simd_kernels.h"

namespace lenet_ext {

namespace {

// Roughly how many multiply-adds a parallel_for chunk should hold, so that
// tiny batches stay on one thread and large ones split evenly.
constexpr int64_t kWorkPerChunk = 1 << 15;

int64_t image_work(const ConvPoolGeometry& g) {
  return g.out_channels * g.out_height * g.out_width * g.pool * g.pool * g.in_channels *
         g.kernel * g.kernel;
}

// The weights packed for the vectorised kernels (simd/packed_weights.h), in
// a tensor that keeps them alive for the call.
struct PackedTensor {
  at::Tensor storage;
  cpu::PackedWeights view;
};

PackedTensor pack_for_simd(const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t c_out = weight.size(0);
  const int64_t per_channel = weight.size(1) * weight.size(2) * weight.size(3);
  at::Tensor storage = at::empty({cpu::PackedWeights::size(c_out, per_channel)}, weight.options());
  const cpu::PackedWeights view =
      cpu::PackedWeights::pack(weight.const_data_ptr<float>(), float_data_or_null(bias), c_out, per_channel,
                               storage.mutable_data_ptr<float>());
  return {storage, view};
}

void forward_simd(const cpu::SimdKernels& kernels, const ConvPoolGeometry& g, const at::Tensor& x,
                  const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  const PackedTensor packed = pack_for_simd(weight, bias);
  const int64_t grain = std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, image_work(g)));
  at::parallel_for(0, g.batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xp(kernels.xp_size(g), 0.0f);
    const cpu::ForwardImages call{x.const_data_ptr<float>(), packed.view, out.mutable_data_ptr<float>(), xp.data()};
    kernels.forward_images(g, call, begin, end);
  });
}

void backward_simd(const cpu::SimdKernels& kernels, const ConvPoolGeometry& g,
                   const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& grad_x, bool need_w, at::Tensor& partials) {
  const PackedTensor packed = pack_for_simd(weight, bias);
  const int64_t chunks = partials.size(0);
  const int64_t weight_numel = weight.numel();
  const int64_t bias_lanes = cpu::PackedWeights::blocks(g.out_channels) * cpu::kLanes;
  float* partial_data = partials.mutable_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> xp(kernels.xp_size(g), 0.0f);
    std::vector<float> dz(kernels.dz_size(g), 0.0f);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      // Weight gradients with their 16 lanes unsummed until the chunk ends.
      std::vector<float> grad_weight_lanes(need_w ? kernels.weight_lanes_size(g) : 0, 0.0f);
      std::vector<float> grad_bias_lanes(bias_lanes, 0.0f);
      const cpu::BackwardImages call{grad_out.const_data_ptr<float>(),
                                     x.const_data_ptr<float>(),
                                     packed.view,
                                     weight.const_data_ptr<float>(),
                                     grad_x.defined() ? grad_x.mutable_data_ptr<float>() : nullptr,
                                     need_w ? grad_weight_lanes.data() : nullptr,
                                     grad_bias_lanes.data(),
                                     xp.data(),
                                     dz.data()};
      kernels.backward_images(g, call, chunk * g.batch / chunks, (chunk + 1) * g.batch / chunks);
      float* partial = partial_data + chunk * (weight_numel + g.out_channels);
      if (need_w) kernels.sum_weight_lanes(g, grad_weight_lanes.data(), partial);
      for (int64_t co = 0; co < g.out_channels; ++co) partial[weight_numel + co] = grad_bias_lanes[co];
    }
  });
}

at::Tensor forward_cpu(const at::Tensor& x_arg, const at::Tensor& weight_arg,
                       const std::optional<at::Tensor>& bias_arg, int64_t padding,
                       int64_t pool) {
  ForwardCall call = prepare_forward(x_arg, weight_arg, bias_arg, padding, pool);
  // Plain references, not structured bindings: lambdas capture these under C++17.
  const ConvPoolGeometry& g = call.g;
  const at::Tensor &x = call.x, &weight = call.weight, &bias = call.bias;
  at::Tensor& out = call.out;
  if (out.numel() == 0) return out;

  if (x.scalar_type() == at::kFloat) {
    const cpu::SimdKernels* kernels = cpu::selected_kernels();
    if (kernels != nullptr && kernels->supported(g)) {
      forward_simd(*kernels, g, x, weight, bias, out);
      return out;
    }
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_sigmoid_avgpool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* w_data = weight.const_data_ptr<scalar_t>();
    const scalar_t* b_data = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const int64_t plane_work = image_work(g) / std::max<int64_t>(1, g.out_channels);
    const int64_t grain = std::max<int64_t>(1, kWorkPerChunk / std::max<int64_t>(1, plane_work));
    // One task is one (image, output channel) plane.
    at::parallel_for(0, g.batch * g.out_channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.out_channels;
        const int64_t co = plane % g.out_channels;
        const scalar_t* x_image = x_data + n * g.in_channels * g.height * g.width;
        const scalar_t* filter = w_data + co * g.in_channels * g.kernel * g.kernel;
        const acc_t b = b_data ? acc_t(b_data[co]) : acc_t(0);
        scalar_t* out_plane = out_data + plane * g.out_height * g.out_width;
        for (int64_t ph = 0; ph < g.out_height; ++ph) {
          for (int64_t pw = 0; pw < g.out_width; ++pw) {
            out_plane[ph * g.out_width + pw] =
                static_cast<scalar_t>(pooled_output<scalar_t, acc_t>(x_image, filter, b, g, ph, pw));
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_arg, const at::Tensor& x_arg, const at::Tensor& weight_arg,
    const std::optional<at::Tensor>& bias_arg, int64_t padding, int64_t pool,
    std::array<bool, 3> output_mask) {
  const BackwardCall call =
      prepare_backward(grad_out_arg, x_arg, weight_arg, bias_arg, padding, pool, output_mask);
  // Plain references, not structured bindings: lambdas capture these under C++17.
  const ConvPoolGeometry& g = call.g;
  const at::Tensor &grad_out = call.grad_out, &x = call.x, &weight = call.weight, &bias = call.bias,
                   &grad_x = call.grad_x;
  const bool need_x = call.need_x, need_w = call.need_weight, need_b = call.need_bias;
  // Each chunk of the batch accumulates its own weight and bias gradients,
  // summed once at the end (one chunk inside lenet_cpu.cpp's parallel
  // region: see parallel.h).
  const int64_t chunks = cpu::chunk_count(g.batch);
  at::Tensor partials = call.param_partials(chunks);
  const int64_t weight_numel = weight.numel();
  if (g.batch > 0 && x.scalar_type() == at::kFloat) {
    const cpu::SimdKernels* kernels = cpu::selected_kernels();
    if (kernels != nullptr && kernels->supported(g)) {
      backward_simd(*kernels, g, grad_out, x, weight, bias, grad_x, need_w, partials);
      return call.finish(partials);
    }
  }

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_sigmoid_avgpool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* w_data = weight.const_data_ptr<scalar_t>();
    const scalar_t* b_data = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx_data = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* partial_data = partials.mutable_data_ptr<acc_t>();
    const int64_t ext_h = pooled_extent(g.out_height, g.pool);
    const int64_t ext_w = pooled_extent(g.out_width, g.pool);
    const int64_t image_numel = g.in_channels * g.height * g.width;

    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      // dL/dz of one image, reused for every image of the chunk.
      std::vector<acc_t> dz(g.out_channels * ext_h * ext_w);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        acc_t* partial = partial_data + chunk * (weight_numel + g.out_channels);
        for (int64_t n = chunk * g.batch / chunks; n < (chunk + 1) * g.batch / chunks; ++n) {
          const scalar_t* x_image = x_data + n * image_numel;
          for (int64_t co = 0; co < g.out_channels; ++co) {
            const scalar_t* grad_plane = go_data + (n * g.out_channels + co) * g.out_height * g.out_width;
            const scalar_t* filter = w_data + co * g.in_channels * g.kernel * g.kernel;
            const acc_t b = b_data ? acc_t(b_data[co]) : acc_t(0);
            for (int64_t oh = 0; oh < ext_h; ++oh) {
              for (int64_t ow = 0; ow < ext_w; ++ow) {
                dz[(co * ext_h + oh) * ext_w + ow] =
                    preactivation_grad<scalar_t, acc_t>(grad_plane, x_image, filter, b, g, oh, ow);
              }
            }
          }
          if (need_x) {
            scalar_t* gx_image = gx_data + n * image_numel;
            for (int64_t ci = 0; ci < g.in_channels; ++ci)
              for (int64_t ih = 0; ih < g.height; ++ih)
                for (int64_t iw = 0; iw < g.width; ++iw)
                  gx_image[(ci * g.height + ih) * g.width + iw] = static_cast<scalar_t>(
                      input_grad<scalar_t, acc_t>(dz.data(), w_data, g, ci, ih, iw));
          }
          if (need_w) {
            int64_t i = 0;
            for (int64_t co = 0; co < g.out_channels; ++co)
              for (int64_t ci = 0; ci < g.in_channels; ++ci)
                for (int64_t kh = 0; kh < g.kernel; ++kh)
                  for (int64_t kw = 0; kw < g.kernel; ++kw)
                    partial[i++] += weight_grad<scalar_t, acc_t>(dz.data(), x_image, g, co, ci, kh, kw);
          }
          if (need_b) {
            for (int64_t co = 0; co < g.out_channels; ++co)
              partial[weight_numel + co] += bias_grad<acc_t>(dz.data(), g, co);
          }
        }
      }
    });
  });

  return call.finish(partials);
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CPU, m) {
  m.impl("conv_sigmoid_avgpool2d", &forward_cpu);
  m.impl("conv_sigmoid_avgpool2d_backward", &backward_cpu);
}

}  // namespace lenet_ext
