// The whole LeNet as three operators: lenet_forward for inference,
// lenet_train_forward, which also returns the activations backward needs,
// and lenet_backward. One dispatch from Python instead of a dozen, which is
// most of the cost at batch 1, and one autograd node for the whole network.
// The conv blocks run the fused operator, the dense block addmm with an
// in-place sigmoid. On the CPU the batch runs in tiles (see for_each_tile).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <torch/library.h>

#include "conv_sigmoid_avgpool2d_host.h"

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

// A dense layer's weight and bias against its input x; `name` is the
// layer's name in the schema (fc1, fc2, fc3).
void check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* op, const char* name) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": expected ", name,
                    "_weight of shape (out_features, ", x.size(1), "), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": expected ", name,
                   "_weight to have x's dtype ", x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": expected ", name, "_weight on x's device ",
                    x.device(), ", got ", weight.device());
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": expected ", name,
                    "_bias to be 1-d of size out_features = ", weight.size(0), ", got shape ",
                    bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": expected ", name,
                   "_bias to have x's dtype ", x.scalar_type(), ", got ", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": expected ", name, "_bias on x's device ",
                    x.device(), ", got ", bias->device());
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* op, const char* name) {
  check_linear(x, weight, bias, op, name);
  if (bias.has_value()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

// The operators' arguments after x.
struct LeNetParams {
  const at::Tensor& conv1_weight;
  const std::optional<at::Tensor>& conv1_bias;
  int64_t conv1_padding, pool1;
  const at::Tensor& conv2_weight;
  const std::optional<at::Tensor>& conv2_bias;
  int64_t conv2_padding, pool2;
  const at::Tensor& fc1_weight;
  const std::optional<at::Tensor>& fc1_bias;
  const at::Tensor& fc2_weight;
  const std::optional<at::Tensor>& fc2_bias;
  const at::Tensor& fc3_weight;
  const std::optional<at::Tensor>& fc3_bias;
};

// The logits and the activations backward reads: the two conv blocks'
// outputs (the second flattened) and the two hidden sigmoids.
struct ForwardResult {
  at::Tensor logits, block1, block2, fc1, fc2;
};

// The two conv blocks (r.block1, r.block2), then the dense layers from
// r.block2.
void conv_layers(const at::Tensor& x, const LeNetParams& p, ForwardResult& r) {
  r.block1 = conv_block(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1);
  r.block2 = conv_block(r.block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2).flatten(1);
}

void dense_layers(const LeNetParams& p, const char* op, ForwardResult& r) {
  r.fc1 = linear(r.block2, p.fc1_weight, p.fc1_bias, op, "fc1").sigmoid_();
  r.fc2 = linear(r.fc1, p.fc2_weight, p.fc2_bias, op, "fc2").sigmoid_();
  r.logits = linear(r.fc2, p.fc3_weight, p.fc3_bias, op, "fc3");
}

ForwardResult forward_images(const at::Tensor& x, const LeNetParams& p, const char* op) {
  ForwardResult r;
  conv_layers(x, p, r);
  dense_layers(p, op, r);
  return r;
}

// On the CPU, tiles of at most this many images run through the whole
// network one at a time, so that a tile's activations stay in cache between
// the layers (64 images of the first block's output are 300 KB).
constexpr int64_t kCpuTile = 64;

// Whether x runs in tiles: CPU batches of more than one tile. Other calls
// run as one, which the operators inside parallelise themselves.
bool runs_in_tiles(const at::Tensor& x) { return x.device().is_cpu() && x.size(0) > kCpuTile; }

// How many chunks for_each_tile cuts x into: one per thread (so one on one
// thread, whose tiles then run in turn).
int64_t tile_chunks(const at::Tensor& x) {
  if (!runs_in_tiles(x)) return 1;
  return std::min<int64_t>(at::get_num_threads(), (x.size(0) + kCpuTile - 1) / kCpuTile);
}

// Runs fn(chunk, begin, end) over chunks of the batch, one per thread, in
// parallel. Chunk numbers let backward keep per-chunk sums, which makes its
// result independent of scheduling.
template <typename Fn>
void for_each_chunk(const at::Tensor& x, const Fn& fn) {
  const int64_t batch = x.size(0);
  if (!runs_in_tiles(x)) {
    fn(0, 0, batch);
    return;
  }
  const int64_t chunks = tile_chunks(x);
  // Worker threads start with default thread-local state; give them the
  // caller's (grad mode, dispatch keys).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk)
      fn(chunk, chunk * batch / chunks, (chunk + 1) * batch / chunks);
  });
}

// Runs fn(start, size) over images [begin, end) of x: on the CPU in equal
// tiles of at most kCpuTile images, so that no thread waits on another's
// extra tile; on other devices as one tile, which their kernels parallelise.
template <typename Fn>
void for_each_tile(const at::Tensor& x, int64_t begin, int64_t end, const Fn& fn) {
  const int64_t tile = x.device().is_cpu() ? kCpuTile : std::max<int64_t>(1, end - begin);
  const int64_t tiles = (end - begin + tile - 1) / tile;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t start = begin + t * (end - begin) / tiles;
    fn(start, begin + (t + 1) * (end - begin) / tiles - start);
  }
}

// Runs the forward into whole-batch tensors, the activations only when
// keep_activations. On the CPU the conv blocks run tile by tile, so that
// block 1's output stays in cache. For inference the dense layers follow on
// the same tile and nothing else is kept; for training they run once per
// chunk on the saved block 2 output, where their matrices are largest.
ForwardResult forward_batch(const at::Tensor& x, const LeNetParams& p, bool keep_activations,
                            const char* op) {
  // Nothing here is differentiated (lenet_train_forward's autograd formula
  // is lenet_backward), and worker threads must not reach the Python
  // autograd wrapper of the conv operator: dispatch below autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (!runs_in_tiles(x)) {
    ForwardResult r = forward_images(x, p, op);
    if (!keep_activations) r.block1 = r.block2 = r.fc1 = r.fc2 = at::Tensor();
    return r;
  }
  // An empty batch runs every argument check and gives every shape before
  // any thread starts.
  const ForwardResult shapes = forward_images(x.narrow(0, 0, 0), p, op);
  const auto batch_like = [&](const at::Tensor& t) {
    auto sizes = t.sizes().vec();
    sizes[0] = x.size(0);
    return at::empty(sizes, t.options());
  };
  ForwardResult out;
  out.logits = batch_like(shapes.logits);
  if (keep_activations) {
    out.block1 = batch_like(shapes.block1);
    out.block2 = batch_like(shapes.block2);
    out.fc1 = batch_like(shapes.fc1);
    out.fc2 = batch_like(shapes.fc2);
  }
  for_each_chunk(x, [&](int64_t, int64_t begin, int64_t end) {
    for_each_tile(x, begin, end, [&](int64_t start, int64_t size) {
      ForwardResult r;
      conv_layers(x.narrow(0, start, size), p, r);
      if (keep_activations) {
        out.block1.narrow(0, start, size).copy_(r.block1);
        out.block2.narrow(0, start, size).copy_(r.block2);
        return;
      }
      dense_layers(p, op, r);
      out.logits.narrow(0, start, size).copy_(r.logits);
    });
    if (!keep_activations) return;
    ForwardResult r;
    r.block2 = out.block2.narrow(0, begin, end - begin);
    dense_layers(p, op, r);
    out.logits.narrow(0, begin, end - begin).copy_(r.logits);
    out.fc1.narrow(0, begin, end - begin).copy_(r.fc1);
    out.fc2.narrow(0, begin, end - begin).copy_(r.fc2);
  });
  return out;
}

#define LENET_PARAMS_ARGS                                                                         \
  const at::Tensor &conv1_weight, const std::optional<at::Tensor>&conv1_bias,                     \
      int64_t conv1_padding, int64_t pool1, const at::Tensor &conv2_weight,                      \
      const std::optional<at::Tensor>&conv2_bias, int64_t conv2_padding, int64_t pool2,           \
      const at::Tensor &fc1_weight, const std::optional<at::Tensor>&fc1_bias,                     \
      const at::Tensor &fc2_weight, const std::optional<at::Tensor>&fc2_bias,                     \
      const at::Tensor &fc3_weight, const std::optional<at::Tensor>&fc3_bias
#define LENET_PARAMS                                                                              \
  LeNetParams {                                                                                   \
    conv1_weight, conv1_bias, conv1_padding, pool1, conv2_weight, conv2_bias, conv2_padding,      \
        pool2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias                   \
  }

at::Tensor lenet_forward(const at::Tensor& x, LENET_PARAMS_ARGS) {
  return forward_batch(x, LENET_PARAMS, false, "lenet_forward").logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_train_forward(
    const at::Tensor& x, LENET_PARAMS_ARGS) {
  ForwardResult r = forward_batch(x, LENET_PARAMS, true, "lenet_train_forward");
  return {r.logits, r.block1, r.block2, r.fc1, r.fc2};
}

// The sum over dim 0 of per-chunk gradient sums. On the CPU a plain loop, in
// chunk order: at::sum would open a parallel region for a few thousand
// numbers.
at::Tensor sum_chunks(const at::Tensor& sums) {
  if (sums.size(0) == 1) return sums.squeeze(0);
  if (!sums.device().is_cpu()) return sums.sum(0);
  at::Tensor total = sums.select(0, 0).clone();
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "lenet_backward_sum_chunks", [&] {
    const int64_t numel = total.numel();
    scalar_t* out = total.mutable_data_ptr<scalar_t>();
    const scalar_t* in = sums.const_data_ptr<scalar_t>();
    for (int64_t chunk = 1; chunk < sums.size(0); ++chunk)
      for (int64_t i = 0; i < numel; ++i) out[i] += in[chunk * numel + i];
  });
  return total;
}

// lenet_backward's gradients, in the order of lenet_train_forward's tensor
// arguments.
enum Grad { kX, kConv1W, kConv1B, kConv2W, kConv2B, kFc1W, kFc1B, kFc2W, kFc2B, kFc3W, kFc3B, kGrads };

void check_saved(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "lenet_backward: expected ", name, " of shape ", expected,
                    " (as lenet_train_forward returns it), got ", t.sizes());
}

// One gradient per tensor argument of lenet_train_forward, in its order; an
// entry is undefined (None) when output_mask leaves it out or the argument is
// None.
using LeNetGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <size_t... I>
LeNetGrads as_tuple(const std::array<at::Tensor, sizeof...(I)>& grads, std::index_sequence<I...>) {
  return {grads[I]...};
}

LeNetGrads lenet_backward(const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& block1,
                          const at::Tensor& block2, const at::Tensor& fc1, const at::Tensor& fc2,
                          LENET_PARAMS_ARGS, std::array<bool, kGrads> mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // The saved activations must be what lenet_train_forward made of x and
  // these parameters; the conv blocks' own checks cover the rest.
  const ConvPoolGeometry g1 = check_forward_args(x, conv1_weight, conv1_bias, conv1_padding, pool1);
  const std::pair<const char*, const at::Tensor*> saved[] = {
      {"block1", &block1}, {"block2", &block2}, {"fc1", &fc1}, {"fc2", &fc2}, {"grad_logits", &grad_logits}};
  for (const auto& [name, t] : saved) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "lenet_backward: expected ", name,
                     " to have x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "lenet_backward: expected ", name,
                      " on x's device ", x.device(), ", got ", t->device());
  }
  check_saved(block1, {g1.batch, g1.out_channels, g1.out_height, g1.out_width}, "block1");
  const ConvPoolGeometry g2 = check_forward_args(block1, conv2_weight, conv2_bias, conv2_padding, pool2);
  check_saved(block2, {g2.batch, g2.out_channels * g2.out_height * g2.out_width}, "block2");
  check_linear(block2, fc1_weight, fc1_bias, "lenet_backward", "fc1");
  check_saved(fc1, {g1.batch, fc1_weight.size(0)}, "fc1");
  check_linear(fc1, fc2_weight, fc2_bias, "lenet_backward", "fc2");
  check_saved(fc2, {g1.batch, fc2_weight.size(0)}, "fc2");
  check_linear(fc2, fc3_weight, fc3_bias, "lenet_backward", "fc3");
  check_saved(grad_logits, {g1.batch, fc3_weight.size(0)}, "grad_logits");

  // A parameter given as None gets no gradient.
  const std::array<const at::Tensor*, kGrads> inputs{
      &x, &conv1_weight, conv1_bias ? &*conv1_bias : nullptr, &conv2_weight,
      conv2_bias ? &*conv2_bias : nullptr, &fc1_weight, fc1_bias ? &*fc1_bias : nullptr,
      &fc2_weight, fc2_bias ? &*fc2_bias : nullptr, &fc3_weight, fc3_bias ? &*fc3_bias : nullptr};
  for (int i = 0; i < kGrads; ++i) mask[i] = mask[i] && inputs[i] != nullptr;
  // needed_below[i]: some gradient at index < i is asked for, so the chain
  // must go on past layer i.
  std::array<bool, kGrads + 1> needed_below{};
  for (int i = 0; i < kGrads; ++i) needed_below[i + 1] = needed_below[i] || mask[i];

  // Per-chunk sums of the parameter gradients, summed over the chunks at the
  // end. Every slot is written by the chunk's first tile before it is added
  // to, so there is no zero fill: one of this size would be a parallel region
  // of its own, and waiting for its threads costs more than the work. An
  // empty batch runs no tile, and its gradients are zeros.
  const int64_t chunks = tile_chunks(x);
  const bool no_tiles = x.size(0) == 0;
  std::array<at::Tensor, kGrads> sums;
  for (int i = kConv1W; i < kGrads; ++i) {
    if (!mask[i]) continue;
    auto sizes = inputs[i]->sizes().vec();
    sizes.insert(sizes.begin(), chunks);
    const auto options = inputs[i]->options().memory_format(at::MemoryFormat::Contiguous);
    sums[i] = no_tiles ? at::zeros(sizes, options) : at::empty(sizes, options);
  }
  at::Tensor grad_x = mask[kX] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();

  for_each_chunk(x, [&](int64_t chunk, int64_t begin, int64_t end) {
    const auto rows = [&](const at::Tensor& t) { return t.narrow(0, begin, end - begin); };
    // The dense layers once for the chunk: each weight gradient is one
    // matrix product into the chunk's slot. A linear layer y = a W^T + b
    // with upstream gradient gy:
    const auto linear_grads = [&](const at::Tensor& gy, const at::Tensor& a, Grad w, Grad b) {
      if (mask[w]) {
        at::Tensor slot = sums[w].select(0, chunk);
        at::mm_out(slot, gy.t(), a);
      }
      if (mask[b]) {
        at::Tensor slot = sums[b].select(0, chunk);
        at::sum_out(slot, gy, 0);
      }
    };
    at::Tensor g = rows(grad_logits);
    linear_grads(g, rows(fc2), kFc3W, kFc3B);
    if (!needed_below[kFc3W]) return;
    g = at::sigmoid_backward(at::mm(g, fc3_weight), rows(fc2));
    linear_grads(g, rows(fc1), kFc2W, kFc2B);
    if (!needed_below[kFc2W]) return;
    g = at::sigmoid_backward(at::mm(g, fc2_weight), rows(fc1));
    linear_grads(g, rows(block2), kFc1W, kFc1B);
    if (!needed_below[kFc1W]) return;
    const at::Tensor grad_block2 =
        at::mm(g, fc1_weight).view({end - begin, g2.out_channels, g2.out_height, g2.out_width});

    // The conv blocks tile by tile, so that block 1's gradient input stays in
    // cache: the chunk's first tile writes its gradient slots, the others add.
    for_each_tile(x, begin, end, [&](int64_t start, int64_t size) {
      const auto tile = [&](const at::Tensor& t) { return t.narrow(0, start, size); };
      const auto add = [&](Grad i, const at::Tensor& grad) {
        at::Tensor slot = sums[i].select(0, chunk);
        start == begin ? slot.copy_(grad) : slot.add_(grad);
      };
      at::Tensor grad_block1, grad_input, grad_weight, grad_bias;
      std::tie(grad_block1, grad_weight, grad_bias) =
          conv_block_backward(grad_block2.narrow(0, start - begin, size), tile(block1), conv2_weight,
                              conv2_bias, conv2_padding, pool2,
                              {needed_below[kConv2W], mask[kConv2W], mask[kConv2B]});
      if (mask[kConv2W]) add(kConv2W, grad_weight);
      if (mask[kConv2B]) add(kConv2B, grad_bias);
      if (!needed_below[kConv2W]) return;
      std::tie(grad_input, grad_weight, grad_bias) =
          conv_block_backward(grad_block1, tile(x), conv1_weight, conv1_bias, conv1_padding, pool1,
                              {mask[kX], mask[kConv1W], mask[kConv1B]});
      if (mask[kConv1W]) add(kConv1W, grad_weight);
      if (mask[kConv1B]) add(kConv1B, grad_bias);
      if (mask[kX]) tile(grad_x).copy_(grad_input);
    });
  });

  std::array<at::Tensor, kGrads> grads;
  grads[kX] = grad_x;
  for (int i = kConv1W; i < kGrads; ++i) {
    if (mask[i]) grads[i] = sum_chunks(sums[i]);
  }
  return as_tuple(grads, std::make_index_sequence<kGrads>{});
}

#undef LENET_PARAMS
#undef LENET_PARAMS_ARGS

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CompositeExplicitAutograd, m) {
  m.impl("lenet_forward", &lenet_forward);
  m.impl("lenet_train_forward", &lenet_train_forward);
  m.impl("lenet_backward", &lenet_backward);
}

}  // namespace lenet_ext
