#include "conv_sigmoid_avgpool2d.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

// register_fake for these is in lenet_ext/ops.py, the autograd kernel in
// autograd/conv_sigmoid_avgpool2d_autograd.cpp.
TORCH_LIBRARY_FRAGMENT(lenet_ext, m) {
  m.set_python_module("lenet_ext.ops");
  m.def(
      "conv_sigmoid_avgpool2d(Tensor x, Tensor weight, Tensor? bias=None, int padding=0, "
      "int pool=2) -> Tensor");
  // Gradients for (x, weight, bias); an entry whose output_mask is false, or
  // the bias entry when bias is None, comes back undefined (None).
  m.def(
      "conv_sigmoid_avgpool2d_backward(Tensor grad_out, Tensor x, Tensor weight, "
      "Tensor? bias, int padding, int pool, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

namespace lenet_ext {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble;
}

// One image's padded input, over the larger of its channel counts: at least
// its conv output, and within a small factor of each per-image buffer of the
// kernels. Past 2^56 elements (far past any memory) sums of such buffers
// could overflow the kernels' int64_t sizes and indices.
bool padded_image_fits(const ConvPoolGeometry& g) {
  const uint64_t twice_padding = 2 * static_cast<uint64_t>(g.padding);  // padding >= 0
  uint64_t height = 0, width = 0, area = 0, elements = 0;
  const uint64_t channels = static_cast<uint64_t>(std::max(g.in_channels, g.out_channels));
  return !c10::add_overflows(static_cast<uint64_t>(g.height), twice_padding, &height) &&
         !c10::add_overflows(static_cast<uint64_t>(g.width), twice_padding, &width) &&
         !c10::mul_overflows(height, width, &area) && !c10::mul_overflows(area, channels, &elements) &&
         elements <= (uint64_t(1) << 56);
}

}  // namespace

ConvPoolGeometry check_forward_args(
    const InputMeta& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
  constexpr const char* op = "conv_sigmoid_avgpool2d: ";
  TORCH_CHECK_VALUE(x.sizes.size() == 4, op, "expected x to be 4-d (N, C_in, H, W), got a ",
                    x.sizes.size(), "-d tensor of shape ", x.sizes);
  TORCH_CHECK_VALUE(weight.dim() == 4, op,
                    "expected weight to be 4-d (C_out, C_in, K, K), got a ",
                    weight.dim(), "-d tensor of shape ", weight.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.dtype), op,
                   "expected x to be float32 or float64, got ", x.dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.dtype, op,
                   "expected weight to have x's dtype ", x.dtype,
                   ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device, op,
                    "expected weight on x's device ", x.device, ", got ",
                    weight.device());
  // Empty channel dimensions are refused, as torch's conv2d refuses them.
  TORCH_CHECK_VALUE(x.sizes[1] >= 1, op, "expected x to have at least one channel, got shape ",
                    x.sizes);
  TORCH_CHECK_VALUE(weight.size(0) >= 1, op,
                    "expected weight to have at least one output channel, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.sizes[1], op,
                    "channel mismatch: x has ", x.sizes[1],
                    " input channels but weight expects ", weight.size(1),
                    " (weight shape ", weight.sizes(), ")");
  TORCH_CHECK_VALUE(weight.size(2) == weight.size(3), op,
                    "expected a square kernel, got weight of shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) >= 1, op, "expected a kernel size >= 1, got weight of shape ",
                    weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == weight.size(0), op,
                      "expected bias to be 1-d of size C_out = ", weight.size(0),
                      ", got shape ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.dtype, op,
                     "expected bias to have x's dtype ", x.dtype, ", got ",
                     b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device, op, "expected bias on x's device ",
                      x.device, ", got ", b.device());
  }
  TORCH_CHECK_VALUE(padding >= 0, op, "expected padding >= 0, got ", padding);

  ConvPoolGeometry g;
  g.batch = x.sizes[0];
  g.in_channels = x.sizes[1];
  g.height = x.sizes[2];
  g.width = x.sizes[3];
  g.out_channels = weight.size(0);
  g.kernel = weight.size(2);
  g.padding = padding;
  g.pool = pool;
  TORCH_CHECK_VALUE(padded_image_fits(g), op, "expected one image padded, max(C_in, C_out) x (H + 2 * padding) x ",
                    "(W + 2 * padding), to have at most 2^56 elements, got padding ", padding, " for x of shape ",
                    x.sizes, " and weight of shape ", weight.sizes());
  TORCH_CHECK_VALUE(g.kernel <= g.height + 2 * padding && g.kernel <= g.width + 2 * padding, op,
                    "kernel size ", g.kernel, " is larger than the padded input ",
                    g.height + 2 * padding, "x", g.width + 2 * padding,
                    " (x of shape ", x.sizes, ", padding ", padding, ")");
  g.conv_height = g.height + 2 * padding - g.kernel + 1;
  g.conv_width = g.width + 2 * padding - g.kernel + 1;
  TORCH_CHECK_VALUE(pool >= 1, op, "expected pool >= 1, got ", pool);
  TORCH_CHECK_VALUE(pool <= g.conv_height && pool <= g.conv_width, op, "pool ", pool,
                    " is larger than the conv output ", g.conv_height, "x", g.conv_width);
  g.out_height = g.conv_height / pool;
  g.out_width = g.conv_width / pool;
  return g;
}

ConvPoolGeometry check_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
  const ConvPoolGeometry g = check_forward_args(x, weight, bias, padding, pool);
  constexpr const char* op = "conv_sigmoid_avgpool2d_backward: ";
  const std::vector<int64_t> expected{g.batch, g.out_channels, g.out_height, g.out_width};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(expected), op,
                    "expected grad_out of shape ", at::IntArrayRef(expected), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op,
                   "expected grad_out to have x's dtype ", x.scalar_type(), ", got ",
                   grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), op, "expected grad_out on x's device ",
                    x.device(), ", got ", grad_out.device());
  return g;
}

ForwardCall prepare_forward(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool) {
  ForwardCall call;
  call.g = check_forward_args(x, weight, bias, padding, pool);
  call.x = x.contiguous();
  call.weight = weight.contiguous();
  call.bias = contiguous_or_undefined(bias);
  const ConvPoolGeometry& g = call.g;
  call.out = at::empty({g.batch, g.out_channels, g.out_height, g.out_width}, call.x.options());
  return call;
}

BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t padding, int64_t pool, std::array<bool, 3> output_mask) {
  BackwardCall call;
  call.g = check_backward_args(grad_out, x, weight, bias, padding, pool);
  call.grad_out = grad_out.contiguous();
  call.x = x.contiguous();
  call.weight = weight.contiguous();
  call.bias = contiguous_or_undefined(bias);
  call.need_x = output_mask[0];
  call.need_weight = output_mask[1];
  call.need_bias = output_mask[2] && bias.has_value();
  call.grad_x = call.need_x ? at::empty_like(call.x) : at::Tensor();
  return call;
}

at::Tensor BackwardCall::param_partials(int64_t chunks, bool zeroed) const {
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const std::array<int64_t, 2> sizes{chunks, weight.numel() + g.out_channels};
  return zeroed ? at::zeros(sizes, options) : at::empty(sizes, options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> BackwardCall::finish(const at::Tensor& partials) const {
  // Each gradient is the sum of its own columns, into a tensor of its own: on
  // a GPU one reduction per gradient, no copies.
  const auto summed = [&](int64_t begin, int64_t size) {
    const at::Tensor columns = partials.narrow(1, begin, size);
    return (partials.size(0) == 1 ? columns.squeeze(0).clone() : sum_partials(columns)).to(weight.scalar_type());
  };
  const int64_t weight_numel = weight.numel();
  at::Tensor grad_weight = need_weight ? summed(0, weight_numel).view(weight.sizes()) : at::Tensor();
  at::Tensor grad_bias = need_bias ? summed(weight_numel, g.out_channels) : at::Tensor();
  return {grad_x, grad_weight, grad_bias};
}

at::Tensor sum_partials(const at::Tensor& partials) {
  if (partials.size(0) == 1) return partials.squeeze(0);
  if (!partials.device().is_cpu()) return partials.sum(0);
  at::Tensor total = partials.select(0, 0).clone(at::MemoryFormat::Contiguous);
  const at::Tensor chunks = partials.contiguous();
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "sum_partials", [&] {
    const int64_t numel = total.numel();
    scalar_t* out = total.mutable_data_ptr<scalar_t>();
    const scalar_t* in = chunks.const_data_ptr<scalar_t>();
    for (int64_t chunk = 1; chunk < chunks.size(0); ++chunk)
      for (int64_t i = 0; i < numel; ++i) out[i] += in[chunk * numel + i];
  });
  return total;
}

bool conv_tile_program_fits(const ConvPoolGeometry& g, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && conv_tile_indices_fit(g);
}

ConvTileForwardParams conv_tile_forward_params(const ForwardCall& call, int tile) {
  ConvTileForwardParams p;
  p.s = make_conv_tile_shape(call.g, tile, /*backward_threads=*/0);
  p.batch = call.g.batch;
  p.x = call.x.const_data_ptr<float>();
  p.weight = call.weight.const_data_ptr<float>();
  p.bias = float_data_or_null(call.bias);
  p.out = call.out.mutable_data_ptr<float>();
  return p;
}

ConvTileBackward prepare_tile_backward(const BackwardCall& call, int tile, int threads) {
  ConvTileBackward r;
  r.tiles = (call.g.batch + tile - 1) / tile;
  const bool need_params = call.need_weight || call.need_bias;
  // Each tile writes its whole row; an empty batch has one row of zeros.
  r.partials = call.param_partials(need_params ? std::max<int64_t>(r.tiles, 1) : 1, /*zeroed=*/r.tiles == 0);
  ConvTileBackwardParams& p = r.params;
  p.s = make_conv_tile_shape(call.g, tile, threads);
  p.batch = call.g.batch;
  p.grad_out = call.grad_out.const_data_ptr<float>();
  p.x = call.x.const_data_ptr<float>();
  p.weight = call.weight.const_data_ptr<float>();
  p.bias = float_data_or_null(call.bias);
  p.grad_x = call.need_x ? call.grad_x.mutable_data_ptr<float>() : nullptr;
  p.partials = need_params ? r.partials.mutable_data_ptr<float>() : nullptr;
  return r;
}

PartialSumsPlan plan_partial_sums(std::vector<ColumnSum> sums, const at::TensorOptions& options) {
  PartialSumsPlan plan;
  while (!sums.empty()) {
    TORCH_CHECK(sums.size() <= kMaxColumnSums, "lenet_ext: more than ", kMaxColumnSums, " sums in one pass");
    int64_t scratch_floats = 0;
    for (const ColumnSum& sum : sums)
      if (row_blocks(sum) > 1) scratch_floats += row_blocks(sum) * sum.columns;
    at::Tensor scratch = scratch_floats > 0 ? at::empty({scratch_floats}, options) : at::Tensor();
    // A sum with several blocks of rows writes a row per block here; the next pass adds them.
    std::vector<ColumnSum> next;
    int64_t used = 0;
    for (ColumnSum& sum : sums) {
      sum.out_row_length = 0;
      if (row_blocks(sum) == 1) continue;
      float* rows = scratch.mutable_data_ptr<float>() + used;
      next.push_back(ColumnSum{rows, row_blocks(sum), sum.columns, 0, sum.columns, sum.out, 0});
      sum.out = rows, sum.out_row_length = sum.columns;
      used += row_blocks(sum) * sum.columns;
    }
    const PartialSumsParams pass = partial_sums_params(sums.data(), static_cast<int>(sums.size()));
    plan.passes.push_back(pass);
    plan.blocks.push_back(pass.first_block[sums.size()]);
    if (scratch.defined()) plan.scratch.push_back(scratch);
    sums = std::move(next);
  }
  return plan;
}

ConvTileSums prepare_tile_sums(const BackwardCall& call, const ConvTileBackward& tiled) {
  ConvTileSums r;
  std::vector<ColumnSum> sums;
  const at::Tensor& partials = tiled.partials;
  const int weights = static_cast<int>(call.weight.numel()), row_length = static_cast<int>(partials.size(1));
  const auto add_sum = [&](at::Tensor& grad, at::IntArrayRef sizes, int column, int columns) {
    grad = at::empty(sizes, call.weight.options());
    sums.push_back(ColumnSum{partials.const_data_ptr<float>(), partials.size(0), row_length, column, columns,
                             grad.mutable_data_ptr<float>(), 0});
  };
  if (call.need_weight) add_sum(r.grad_weight, call.weight.sizes(), 0, weights);
  if (call.need_bias) add_sum(r.grad_bias, {call.g.out_channels}, weights, static_cast<int>(call.g.out_channels));
  r.plan = plan_partial_sums(std::move(sums), partials.options());
  return r;
}

}  // namespace lenet_ext
