// The whole LeNet forward as one operator, for inference: one dispatch from
// Python instead of a dozen, which is most of the cost at batch 1. The conv
// blocks run the fused operator, the dense block addmm with an in-place
// sigmoid. It has no autograd formula: LeNet calls it only with gradients
// off, and a backward through it raises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <torch/library.h>

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
                  const char* name) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), "lenet_forward: expected ", name,
                    " of shape (out_features, ", x.size(1), "), got ", weight.sizes());
  if (bias.has_value()) return at::addmm(*bias, x, weight.t());
  return at::mm(x, weight.t());
}

// The operator's arguments after x.
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

at::Tensor whole_batch(const at::Tensor& x, const LeNetParams& p) {
  // Nothing here is differentiated, and worker threads must not reach the
  // Python autograd wrapper of the conv operator: dispatch below autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor h = conv_block(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1);
  h = conv_block(h, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2).flatten(1);
  h = linear(h, p.fc1_weight, p.fc1_bias, "fc1_weight").sigmoid_();
  h = linear(h, p.fc2_weight, p.fc2_bias, "fc2_weight").sigmoid_();
  return linear(h, p.fc3_weight, p.fc3_bias, "fc3_weight");
}

// On the CPU, tiles of at most this many images run through the whole
// network one at a time, so that a tile's activations stay in cache between
// the layers (64 images of the first block's output are 300 KB); the tiles
// run in parallel.
constexpr int64_t kCpuTile = 64;

at::Tensor lenet_forward(const at::Tensor& x, const at::Tensor& conv1_weight,
                         const std::optional<at::Tensor>& conv1_bias, int64_t conv1_padding,
                         int64_t pool1, const at::Tensor& conv2_weight,
                         const std::optional<at::Tensor>& conv2_bias, int64_t conv2_padding,
                         int64_t pool2, const at::Tensor& fc1_weight,
                         const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                         const std::optional<at::Tensor>& fc2_bias, const at::Tensor& fc3_weight,
                         const std::optional<at::Tensor>& fc3_bias) {
  const LeNetParams params{conv1_weight, conv1_bias, conv1_padding, pool1,
                           conv2_weight, conv2_bias, conv2_padding, pool2,
                           fc1_weight,   fc1_bias,   fc2_weight,    fc2_bias,
                           fc3_weight,   fc3_bias};
  const auto run = [&](const at::Tensor& images) { return whole_batch(images, params); };
  if (!x.device().is_cpu() || x.dim() != 4 || x.size(0) <= kCpuTile) return run(x);
  const int64_t batch = x.size(0);
  // An empty batch runs every argument check and gives the output's width
  // before any thread starts.
  const int64_t out_features = run(x.narrow(0, 0, 0)).size(1);
  // A whole number of tiles per thread, so that no thread waits on another's
  // extra tile.
  const int64_t threads = at::get_num_threads();
  const int64_t tiles = ((batch + kCpuTile - 1) / kCpuTile + threads - 1) / threads * threads;
  const int64_t tile = (batch + tiles - 1) / tiles;
  at::Tensor out = at::empty({batch, out_features}, x.options());
  // Worker threads start with default thread-local state; give them the
  // caller's (inference mode, grad mode, dispatch keys).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t start = t * tile;
      if (start >= batch) break;
      const int64_t size = std::min(tile, batch - start);
      out.narrow(0, start, size).copy_(run(x.narrow(0, start, size)));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CompositeExplicitAutograd, m) {
  m.impl("lenet_forward", &lenet_forward);
}

}  // namespace lenet_ext
