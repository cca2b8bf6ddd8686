// LeNet's three operators: their schemas, their argument checks, the steps
// every device's implementation is built from (see lenet.h), and the
// implementation for devices without one of their own, which runs the whole
// batch at once. The CPU's, in tiles, is cpu/lenet_cpu.cpp; CUDA's
// forwards are cuda/lenet_cuda.cu. Also the preparation of the CUDA tile
// program's call.
#include "lenet.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <utility>

#include "conv_sigmoid_avgpool2d.h"

// register_fake for these is in lenet_ext/ops.py; lenet_train_forward's autograd
// kernel in autograd/lenet_autograd.cpp.
TORCH_LIBRARY_FRAGMENT(lenet_ext, m) {
  m.set_python_module("lenet_ext.ops");
  // The whole forward (two conv blocks, then Linear-Sigmoid-Linear-Sigmoid-
  // Linear) in one call, for inference.
  m.def("lenet_forward(Tensor x, " LENET_PARAMS_SCHEMA ") -> Tensor");
  // The same forward for training: the logits, then the activations
  // lenet_backward reads (block2 flattened to (N, features)).
  m.def(
      "lenet_train_forward(Tensor x, " LENET_PARAMS_SCHEMA
      ") -> (Tensor logits, Tensor block1, Tensor block2, Tensor fc1, Tensor fc2)");
  // Gradients for x and the ten parameters, in argument order; an entry whose
  // output_mask is false, or whose argument is None, comes back undefined.
  m.def(
      "lenet_backward(Tensor grad_logits, Tensor x, Tensor block1, Tensor block2, Tensor fc1, "
      "Tensor fc2, " LENET_PARAMS_SCHEMA
      ", bool[11] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
}

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
                  const char* op, const char* name) {
  check_linear(meta_of(x), weight, bias, op, name);
  if (bias.has_value()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

void check_saved(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "lenet_backward: expected ", name, " of shape ", expected,
                    " (as lenet_train_forward returns it), got ", t.sizes());
}

template <size_t... I>
LeNetGrads tuple_of(const LeNetGradArray& grads, std::index_sequence<I...>) {
  return {grads[I]...};
}

}  // namespace

void check_linear(const InputMeta& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* op, const char* name) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.sizes[1], op, ": expected ", name,
                    "_weight of shape (out_features, ", x.sizes[1], "), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.dtype, op, ": expected ", name,
                   "_weight to have x's dtype ", x.dtype, ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device, op, ": expected ", name, "_weight on x's device ",
                    x.device, ", got ", weight.device());
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": expected ", name,
                    "_bias to be 1-d of size out_features = ", weight.size(0), ", got shape ",
                    bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.dtype, op, ": expected ", name,
                   "_bias to have x's dtype ", x.dtype, ", got ", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->device() == x.device, op, ": expected ", name, "_bias on x's device ",
                    x.device, ", got ", bias->device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_block_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t padding, int64_t pool, std::array<bool, 3> mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lenet_ext::conv_sigmoid_avgpool2d_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, int64_t, int64_t, std::array<bool, 3>)>();
  return op.call(grad_out, x, weight, bias, padding, pool, mask);
}

LeNetGrads as_tuple(const LeNetGradArray& grads) {
  return tuple_of(grads, std::make_index_sequence<kGrads>{});
}

const at::Tensor& parameter(const LeNetParams& p, LeNetGrad i) {
  const std::optional<at::Tensor>* bias = nullptr;
  switch (i) {
    case kConv1W: return p.conv1_weight;
    case kConv2W: return p.conv2_weight;
    case kFc1W: return p.fc1_weight;
    case kFc2W: return p.fc2_weight;
    case kFc3W: return p.fc3_weight;
    case kConv1B: bias = &p.conv1_bias; break;
    case kConv2B: bias = &p.conv2_bias; break;
    case kFc1B: bias = &p.fc1_bias; break;
    case kFc2B: bias = &p.fc2_bias; break;
    case kFc3B: bias = &p.fc3_bias; break;
    default: break;
  }
  TORCH_CHECK(bias != nullptr && bias->has_value(), "lenet_ext: no parameter for gradient ", int(i));
  return **bias;
}

void conv_blocks(const at::Tensor& x, const LeNetParams& p, LeNetActivations& r) {
  r.block1 = conv_block(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1);
  r.block2 = conv_block(r.block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2).flatten(1);
}

void dense_layers(const LeNetParams& p, const char* op, LeNetActivations& r) {
  r.fc1 = linear(r.block2, p.fc1_weight, p.fc1_bias, op, "fc1").sigmoid_();
  r.fc2 = linear(r.fc1, p.fc2_weight, p.fc2_bias, op, "fc2").sigmoid_();
  r.logits = linear(r.fc2, p.fc3_weight, p.fc3_bias, op, "fc3");
}

LeNetBackwardCall check_backward_args(const at::Tensor& grad_logits, const at::Tensor& x,
                                      const LeNetActivations& saved, const LeNetParams& p,
                                      const LeNetGradMask& output_mask) {
  // The saved activations must be what lenet_train_forward made of x and
  // these parameters; the conv blocks' own checks cover the rest.
  const ConvPoolGeometry g1 = check_forward_args(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1);
  const std::pair<const char*, const at::Tensor*> tensors[] = {{"block1", &saved.block1},
                                                               {"block2", &saved.block2},
                                                               {"fc1", &saved.fc1},
                                                               {"fc2", &saved.fc2},
                                                               {"grad_logits", &grad_logits}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "lenet_backward: expected ", name,
                     " to have x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "lenet_backward: expected ", name,
                      " on x's device ", x.device(), ", got ", t->device());
  }
  check_saved(saved.block1, {g1.batch, g1.out_channels, g1.out_height, g1.out_width}, "block1");
  const ConvPoolGeometry g2 =
      check_forward_args(saved.block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2);
  check_saved(saved.block2, {g2.batch, g2.out_channels * g2.out_height * g2.out_width}, "block2");
  check_linear(meta_of(saved.block2), p.fc1_weight, p.fc1_bias, "lenet_backward", "fc1");
  check_saved(saved.fc1, {g1.batch, p.fc1_weight.size(0)}, "fc1");
  check_linear(meta_of(saved.fc1), p.fc2_weight, p.fc2_bias, "lenet_backward", "fc2");
  check_saved(saved.fc2, {g1.batch, p.fc2_weight.size(0)}, "fc2");
  check_linear(meta_of(saved.fc2), p.fc3_weight, p.fc3_bias, "lenet_backward", "fc3");
  check_saved(grad_logits, {g1.batch, p.fc3_weight.size(0)}, "grad_logits");

  LeNetBackwardCall call;
  // A parameter given as None gets no gradient.
  const bool given[kGrads] = {true, true, p.conv1_bias.has_value(), true, p.conv2_bias.has_value(),
                              true, p.fc1_bias.has_value(), true, p.fc2_bias.has_value(),
                              true, p.fc3_bias.has_value()};
  call.needed_below[0] = false;
  for (int i = 0; i < kGrads; ++i) {
    call.mask[i] = output_mask[i] && given[i];
    call.needed_below[i + 1] = call.needed_below[i] || call.mask[i];
  }
  call.block1 = g1, call.block2 = g2;
  return call;
}

at::Tensor dense_backward(const at::Tensor& grad_logits, const LeNetActivations& saved,
                          const LeNetParams& p, const LeNetBackwardCall& call, LeNetGradArray& slots) {
  const LeNetGradMask& mask = call.mask;
  // A linear layer y = a W^T + b with upstream gradient gy.
  const auto linear_grads = [&](const at::Tensor& gy, const at::Tensor& a, LeNetGrad w, LeNetGrad b) {
    if (mask[w]) at::mm_out(slots[w], gy.t(), a);
    if (mask[b]) at::sum_out(slots[b], gy, 0);
  };
  at::Tensor g = grad_logits;
  linear_grads(g, saved.fc2, kFc3W, kFc3B);
  if (!call.needed_below[kFc3W]) return at::Tensor();
  g = at::sigmoid_backward(at::mm(g, p.fc3_weight), saved.fc2);
  linear_grads(g, saved.fc1, kFc2W, kFc2B);
  if (!call.needed_below[kFc2W]) return at::Tensor();
  g = at::sigmoid_backward(at::mm(g, p.fc2_weight), saved.fc1);
  linear_grads(g, saved.block2, kFc1W, kFc1B);
  if (!call.needed_below[kFc1W]) return at::Tensor();
  const ConvPoolGeometry& b2 = call.block2;
  return at::mm(g, p.fc1_weight).view({g.size(0), b2.out_channels, b2.out_height, b2.out_width});
}

LeNetActivations forward_whole_batch(const at::Tensor& x, const LeNetParams& p, const char* op) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  LeNetActivations r;
  conv_blocks(x, p, r);
  dense_layers(p, op, r);
  return r;
}

LeNetGrads lenet_backward_whole_batch(const at::Tensor& grad_logits, const at::Tensor& x,
                                      const LeNetActivations& saved, const LeNetParams& p,
                                      const LeNetGradMask& output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LeNetBackwardCall call = check_backward_args(grad_logits, x, saved, p, output_mask);
  // The dense layers write their gradients into these; the conv blocks'
  // come back as new tensors.
  LeNetGradArray grads;
  for (int i = kFc1W; i < kGrads; ++i) {
    if (call.mask[i]) grads[i] = at::empty_like(parameter(p, LeNetGrad(i)), at::MemoryFormat::Contiguous);
  }
  const at::Tensor grad_block2 = dense_backward(grad_logits, saved, p, call, grads);
  if (grad_block2.defined()) {
    grads[kX] = conv_backward(grad_block2, saved.block1, x, p, call,
                              [&](LeNetGrad i, const at::Tensor& grad) { grads[i] = grad; });
  }
  return as_tuple(grads);
}

bool tile_program_fits(const at::Tensor& x, const LeNetParams& p) {
  const bool float32 = x.scalar_type() == at::kFloat && p.conv1_weight.scalar_type() == at::kFloat;
  // 32-bit offsets inside a tile; the widest layer bounds the rest.
  return float32 && x.dim() == 4 && x.size(1) * x.size(2) * x.size(3) < (int64_t(1) << 24) &&
         p.fc1_weight.numel() < (int64_t(1) << 31);
}

LeNetSizes check_lenet_args(const at::Tensor& x, const LeNetParams& p, const char* op) {
  const ConvPoolGeometry g1 = check_forward_args(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1);
  const int64_t block1_sizes[] = {g1.batch, g1.out_channels, g1.out_height, g1.out_width};
  const InputMeta block1{block1_sizes, x.scalar_type(), x.device()};
  const ConvPoolGeometry g2 = check_forward_args(block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2);
  const int64_t dense_in[][2] = {{g1.batch, g2.out_channels * g2.out_height * g2.out_width},
                                 {g1.batch, p.fc1_weight.size(0)},
                                 {g1.batch, p.fc2_weight.size(0)}};
  check_linear({dense_in[0], block1.dtype, block1.device}, p.fc1_weight, p.fc1_bias, op, "fc1");
  check_linear({dense_in[1], block1.dtype, block1.device}, p.fc2_weight, p.fc2_bias, op, "fc2");
  check_linear({dense_in[2], block1.dtype, block1.device}, p.fc3_weight, p.fc3_bias, op, "fc3");
  return {g1, g2};
}

LeNetTileCall prepare_tile_call(const at::Tensor& x, const LeNetParams& p, bool train,
                                c10::function_ref<int(const LeNetTileShape&)> tile_for) {
  const LeNetSizes sizes = check_lenet_args(x, p, train ? "lenet_train_forward" : "lenet_forward");
  const ConvPoolGeometry &g1 = sizes.block1, &g2 = sizes.block2;
  const int64_t batch = g1.batch, f0 = g2.out_channels * g2.out_height * g2.out_width;
  const int64_t f1 = p.fc1_weight.size(0), f2 = p.fc2_weight.size(0), f3 = p.fc3_weight.size(0);
  const LeNetTileShape one_image =
      make_tile_shape(x.size(1), x.size(2), x.size(3), p.conv1_weight.size(0), p.conv1_weight.size(2),
                      p.conv1_padding, p.pool1, p.conv2_weight.size(0), p.conv2_weight.size(2), p.conv2_padding,
                      p.pool2, f1, f2, f3, 1);
  TORCH_CHECK(one_image.f0 == f0, "lenet_forward: tile program and layers disagree on block 2");
  LeNetTileCall call;
  const int tile = tile_for(one_image);
  call.params.s.tile = 0;
  if (tile == 0) return call;
  call.params.s = retile(one_image, tile);
  call.tensors = {x.contiguous(),
                  p.conv1_weight.contiguous(), contiguous_or_undefined(p.conv1_bias),
                  p.conv2_weight.contiguous(), contiguous_or_undefined(p.conv2_bias),
                  p.fc1_weight.contiguous(),   contiguous_or_undefined(p.fc1_bias),
                  p.fc2_weight.contiguous(),   contiguous_or_undefined(p.fc2_bias),
                  p.fc3_weight.contiguous(),   contiguous_or_undefined(p.fc3_bias)};
  LeNetActivations& out = call.out;
  out.logits = at::empty({batch, f3}, x.options());
  if (train) {
    out.block1 = at::empty({batch, g1.out_channels, g1.out_height, g1.out_width}, x.options());
    out.block2 = at::empty({batch, f0}, x.options());
    out.fc1 = at::empty({batch, f1}, x.options());
    out.fc2 = at::empty({batch, f2}, x.options());
  }
  const auto data = [&](int i) { return float_data_or_null(call.tensors[i]); };
  const auto output = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; };
  const auto dense = [&](int weight, int bias) {
    const at::Tensor& w = call.tensors[weight];
    const bool aligned = reinterpret_cast<uintptr_t>(w.const_data_ptr<float>()) % 16 == 0;
    return TileDenseLayer{data(weight), data(bias), static_cast<int>(w.size(1)), static_cast<int>(w.size(0)),
                      w.size(1) % 4 == 0 && aligned};
  };
  LeNetTileParams& tp = call.params;
  tp.batch = batch;
  tp.x = data(kX);
  tp.conv1_w = data(kConv1W), tp.conv1_b = data(kConv1B), tp.conv2_w = data(kConv2W), tp.conv2_b = data(kConv2B);
  tp.fc1 = dense(kFc1W, kFc1B), tp.fc2 = dense(kFc2W, kFc2B), tp.fc3 = dense(kFc3W, kFc3B);
  tp.logits = output(out.logits);
  tp.block1 = output(out.block1), tp.block2 = output(out.block2);
  tp.fc1_out = output(out.fc1), tp.fc2_out = output(out.fc2);
  return call;
}

namespace {

// --- the whole-batch implementation ------------------------------------------
// Every layer on the whole batch at once, for devices whose kernels
// parallelise over the batch themselves. Nothing here is differentiated
// (lenet_train_forward's autograd formula is lenet_backward): dispatch below
// autograd.

at::Tensor lenet_forward(const at::Tensor& x, LENET_PARAMS_ARGS) {
  return forward_whole_batch(x, LENET_PARAMS, "lenet_forward").logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_train_forward(
    const at::Tensor& x, LENET_PARAMS_ARGS) {
  LeNetActivations r = forward_whole_batch(x, LENET_PARAMS, "lenet_train_forward");
  return {r.logits, r.block1, r.block2, r.fc1, r.fc2};
}

LeNetGrads lenet_backward(const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& block1,
                          const at::Tensor& block2, const at::Tensor& fc1, const at::Tensor& fc2,
                          LENET_PARAMS_ARGS, LeNetGradMask output_mask) {
  const LeNetActivations saved{.block1 = block1, .block2 = block2, .fc1 = fc1, .fc2 = fc2};
  return lenet_backward_whole_batch(grad_logits, x, saved, LENET_PARAMS, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CompositeExplicitAutograd, m) {
  m.impl("lenet_forward", &lenet_forward);
  m.impl("lenet_train_forward", &lenet_train_forward);
  m.impl("lenet_backward", &lenet_backward);
}

}  // namespace lenet_ext
