// CUDA kernels of the fused conv -> sigmoid -> avgpool operator.
//
// float32 runs the tile programs of ../tile/conv_sigmoid_avgpool2d_tile.h through
// tile_program.cuh's kernel: one launch for the forward, one for the backward
// (plus one adding its per-tile partial sums, ../tile/tile_partial_sums.h), every
// intermediate in shared memory.
// float64, sizes whose tile does not fit a block's shared memory, and
// LENET_EXT_CUDA_KERNEL=reference run the reference kernels below: one thread
// per output, built from the per-element math in
// ../conv_sigmoid_avgpool2d_math.h that the CPU shares.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../conv_sigmoid_avgpool2d.h"
#include "../conv_sigmoid_avgpool2d_math.h"
#include "../tile/conv_sigmoid_avgpool2d_tile_backward.h"
#include "../cuda_kernel_choice.h"
#include "tile_program.cuh"

namespace lenet_ext {

namespace {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `total` elements. The cap keeps the grid
// legal; the 64-bit loop index covers whatever the cap leaves over.
int64_t blocks_for(int64_t total) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  return std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
}

__device__ __forceinline__ int64_t global_thread_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() {
  return int64_t(blockDim.x) * gridDim.x;
}

// One thread per pooled output (n, co, ph, pw).
template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                               const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                               ConvPoolGeometry g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = global_thread_index(); i < total; i += grid_stride()) {
    const int64_t pw = i % g.out_width;
    const int64_t ph = (i / g.out_width) % g.out_height;
    const int64_t co = (i / (g.out_width * g.out_height)) % g.out_channels;
    const int64_t n = i / (g.out_width * g.out_height * g.out_channels);
    const acc_t b = bias ? acc_t(bias[co]) : acc_t(0);
    out[i] = static_cast<scalar_t>(pooled_output<scalar_t, acc_t>(
        x + n * g.in_channels * g.height * g.width,
        weight + co * g.in_channels * g.kernel * g.kernel, b, g, ph, pw));
  }
}

// One thread per conv output (n, co, oh, ow) inside the pooled extent:
// recomputes z and writes dL/dz.
template <typename scalar_t, typename acc_t>
__global__ void preactivation_grad_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    acc_t* __restrict__ dz, ConvPoolGeometry g, int64_t total) {
  const int64_t ext_h = pooled_extent(g.out_height, g.pool);
  const int64_t ext_w = pooled_extent(g.out_width, g.pool);
  for (int64_t i = global_thread_index(); i < total; i += grid_stride()) {
    const int64_t ow = i % ext_w;
    const int64_t oh = (i / ext_w) % ext_h;
    const int64_t co = (i / (ext_w * ext_h)) % g.out_channels;
    const int64_t n = i / (ext_w * ext_h * g.out_channels);
    const acc_t b = bias ? acc_t(bias[co]) : acc_t(0);
    dz[i] = preactivation_grad<scalar_t, acc_t>(
        grad_out + (n * g.out_channels + co) * g.out_height * g.out_width,
        x + n * g.in_channels * g.height * g.width,
        weight + co * g.in_channels * g.kernel * g.kernel, b, g, oh, ow);
  }
}

// One thread per input element (n, ci, ih, iw): a gather, so no atomics.
template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(const acc_t* __restrict__ dz, const scalar_t* __restrict__ weight,
                                  scalar_t* __restrict__ grad_x, ConvPoolGeometry g,
                                  int64_t total) {
  const int64_t dz_image = g.out_channels * pooled_extent(g.out_height, g.pool) *
                           pooled_extent(g.out_width, g.pool);
  for (int64_t i = global_thread_index(); i < total; i += grid_stride()) {
    const int64_t iw = i % g.width;
    const int64_t ih = (i / g.width) % g.height;
    const int64_t ci = (i / (g.width * g.height)) % g.in_channels;
    const int64_t n = i / (g.width * g.height * g.in_channels);
    grad_x[i] = static_cast<scalar_t>(
        input_grad<scalar_t, acc_t>(dz + n * dz_image, weight, g, ci, ih, iw));
  }
}

// blockIdx.x picks one weight element (or, past the weights, one bias),
// blockIdx.y one chunk of the batch. The block's threads walk the chunk's
// conv outputs in memory order (image, row, column), so that neighbouring
// threads read neighbouring columns of dz and of x: coalesced loads. Each
// thread's sum, then the block's tree reduction, run in a fixed order, so
// partials[chunk, element] is bitwise repeatable.
template <typename scalar_t, typename acc_t>
__global__ void param_grad_kernel(const acc_t* __restrict__ dz, const scalar_t* __restrict__ x,
                                  acc_t* __restrict__ partials, ConvPoolGeometry g,
                                  int64_t images_per_chunk) {
  const int64_t weight_numel = g.out_channels * g.in_channels * g.kernel * g.kernel;
  const int64_t element = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t ext_w = pooled_extent(g.out_width, g.pool);
  const int64_t positions = pooled_extent(g.out_height, g.pool) * ext_w;
  const int64_t n_begin = chunk * images_per_chunk;
  const int64_t n_end = min(n_begin + images_per_chunk, g.batch);
  const bool is_weight = element < weight_numel;
  const int64_t co = is_weight ? element / (g.kernel * g.kernel * g.in_channels) : element - weight_numel;
  const int64_t ci = (element / (g.kernel * g.kernel)) % g.in_channels;
  const int64_t kh = (element / g.kernel) % g.kernel;
  const int64_t kw = element % g.kernel;

  acc_t sum = 0;
  for (int64_t t = threadIdx.x; t < (n_end - n_begin) * positions; t += blockDim.x) {
    const int64_t n = n_begin + t / positions;
    const int64_t pos = t % positions;
    const acc_t d = dz[(n * g.out_channels + co) * positions + pos];
    if (!is_weight) {
      sum += d;
      continue;
    }
    const int64_t ih = pos / ext_w + kh - g.padding;
    const int64_t iw = pos % ext_w + kw - g.padding;
    if (ih >= 0 && ih < g.height && iw >= 0 && iw < g.width)
      sum += d * acc_t(x[((n * g.in_channels + ci) * g.height + ih) * g.width + iw]);
  }

  __shared__ acc_t block_sums[kThreads];
  block_sums[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) block_sums[threadIdx.x] += block_sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[chunk * gridDim.x + element] = block_sums[0];
}

// --- the tile programs ---------------------------------------------------------

// Images per block for the forward or the backward program; 0 runs the
// reference kernels (LENET_EXT_CUDA_KERNEL=reference, float64, a tile of one
// image too large for shared memory).
int choose_conv_tile(const ConvPoolGeometry& g, const at::Tensor& x, bool backward) {
  if (cuda_reference_selected() || !conv_tile_program_fits(g, x)) return 0;
  const auto floats_for = [&](int tile) {
    return make_conv_tile_shape(g, tile, backward ? kTileProgramThreads : 0).floats;
  };
  if (backward) return choose_tile<ConvTileBackwardProgram>(g.batch, x.device().index(), floats_for);
  return choose_tile<ConvTileForwardProgram>(g.batch, x.device().index(), floats_for);
}

// --- the operator ------------------------------------------------------------

at::Tensor forward_cuda(const at::Tensor& x_arg, const at::Tensor& weight_arg,
                        const std::optional<at::Tensor>& bias_arg, int64_t padding,
                        int64_t pool) {
  const ForwardCall call = prepare_forward(x_arg, weight_arg, bias_arg, padding, pool);
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  // Plain references, not structured bindings: lambdas capture these under C++17.
  const ConvPoolGeometry& g = call.g;
  const at::Tensor &x = call.x, &weight = call.weight, &bias = call.bias, &out = call.out;
  const int64_t total = out.numel();
  if (total == 0) return out;

  if (const int tile = choose_conv_tile(g, x, /*backward=*/false)) {
    launch_tile_program<ConvTileForwardProgram>(conv_tile_forward_params(call, tile), (g.batch + tile - 1) / tile);
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_sigmoid_avgpool2d_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), g, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& x_arg, const at::Tensor& weight_arg,
    const std::optional<at::Tensor>& bias_arg, int64_t padding, int64_t pool,
    std::array<bool, 3> output_mask) {
  const BackwardCall call =
      prepare_backward(grad_out_arg, x_arg, weight_arg, bias_arg, padding, pool, output_mask);
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  const ConvPoolGeometry& g = call.g;
  const at::Tensor &grad_out = call.grad_out, &x = call.x, &weight = call.weight, &bias = call.bias,
                   &grad_x = call.grad_x;
  const bool need_x = call.need_x, need_w = call.need_weight, need_b = call.need_bias;
  if (!need_x && !need_w && !need_b) return call.finish(call.param_partials(1));
  if (const int tile = g.batch > 0 ? choose_conv_tile(g, x, /*backward=*/true) : 0) {
    const ConvTileBackward tiled = prepare_tile_backward(call, tile, kTileProgramThreads);
    const ConvTileSums sums = prepare_tile_sums(call, tiled);
    launch_tile_program<ConvTileBackwardProgram>(tiled.params, tiled.tiles);
    launch_partial_sums(sums.plan);
    return {grad_x, sums.grad_weight, sums.grad_bias};
  }
  // At least 1: check_forward_args refuses C_out = 0.
  const int64_t param_numel = weight.numel() + g.out_channels;
  // Enough batch chunks to fill the GPU, but a block's worth of conv outputs
  // (kThreads) in each at least.
  const int64_t positions = pooled_extent(g.out_height, g.pool) * pooled_extent(g.out_width, g.pool);
  const int64_t min_images = std::max<int64_t>(1, (kThreads + positions - 1) / std::max<int64_t>(1, positions));
  const int64_t max_chunks = std::max<int64_t>(1, (g.batch + min_images - 1) / min_images);
  const int64_t wanted_chunks =
      (2 * multiprocessor_count(x.device().index()) + param_numel - 1) / param_numel;
  const int64_t chunks = std::max<int64_t>(1, std::min(max_chunks, wanted_chunks));
  const int64_t images_per_chunk = std::max<int64_t>(1, (g.batch + chunks - 1) / chunks);
  at::Tensor partials = call.param_partials(chunks);

  const int64_t dz_total = g.batch * g.out_channels * pooled_extent(g.out_height, g.pool) *
                           pooled_extent(g.out_width, g.pool);
  if (dz_total > 0 && (need_x || need_w || need_b)) {
    // dL/dz, the gradient behind the pool and the sigmoid; x and the weights
    // are read from it by the two gradient kernels below.
    at::Tensor dz = at::empty({dz_total}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_sigmoid_avgpool2d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      const scalar_t* w_data = weight.const_data_ptr<scalar_t>();
      acc_t* dz_data = dz.mutable_data_ptr<acc_t>();
      preactivation_grad_kernel<scalar_t, acc_t><<<blocks_for(dz_total), kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), x_data, w_data,
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, dz_data, g, dz_total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_x) {
        const int64_t x_total = x.numel();
        input_grad_kernel<scalar_t, acc_t><<<blocks_for(x_total), kThreads, 0, stream>>>(
            dz_data, w_data, grad_x.mutable_data_ptr<scalar_t>(), g, x_total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_w || need_b) {
        const dim3 grid(static_cast<unsigned>(param_numel), static_cast<unsigned>(chunks));
        param_grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            dz_data, x_data, partials.mutable_data_ptr<acc_t>(), g, images_per_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else if (need_x) {
    grad_x.zero_();
  }
  return call.finish(partials);
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CUDA, m) {
  m.impl("conv_sigmoid_avgpool2d", &forward_cuda);
  m.impl("conv_sigmoid_avgpool2d_backward", &backward_cuda);
}

}  // namespace lenet_ext
