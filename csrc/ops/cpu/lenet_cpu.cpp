// LeNet's three operators on the CPU. The batch runs in tiles of at most
// kTile images, so that a tile's activations stay in cache from one layer to
// the next (64 images of the first block's output are 300 KB), and the tiles
// in chunks, one per thread, each thread summing its own parameter gradients.
// A batch of at most one tile takes the one-pass path of lenet_small_batch.h
// instead where its kernels apply (float32, vectorised kernels), and
// otherwise, for a backward, the whole-batch version that other devices run
// (../lenet.cpp). The steps are lenet.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "../conv_sigmoid_avgpool2d.h"
#include "../lenet.h"
#include "lenet_small_batch.h"
#include "parallel.h"

namespace lenet_ext {

namespace {

constexpr int64_t kTile = 64;
static_assert(kSmallBatch == kTile, "a batch of at most one tile takes the one-pass path (lenet_small_batch.h)");

// Chunks of a batch of more than one tile: one per thread, with at most as
// many chunks as tiles.
int64_t batch_chunks(int64_t batch) { return cpu::chunk_count((batch + kTile - 1) / kTile); }

// Runs fn(chunk, begin, end) over the chunks of a batch, in parallel. The
// conv operators fn calls run on its thread alone (see parallel.h).
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t chunks, const Fn& fn) {
  if (chunks == 1) {
    fn(0, 0, batch);
    return;
  }
  // Worker threads start with default thread-local state; give them the
  // caller's (grad mode, dispatch keys).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk)
      fn(chunk, chunk * batch / chunks, (chunk + 1) * batch / chunks);
  });
}

// Runs fn(start, size) over images [begin, end) in equal tiles of at most
// kTile images, so that no thread waits on another's extra tile.
template <typename Fn>
void for_each_tile(int64_t begin, int64_t end, const Fn& fn) {
  const int64_t tiles = (end - begin + kTile - 1) / kTile;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t start = begin + t * (end - begin) / tiles;
    fn(start, begin + (t + 1) * (end - begin) / tiles - start);
  }
}

// The forward into whole-batch tensors, the activations only when
// keep_activations. The conv blocks run tile by tile. For inference the
// dense layers follow on the same tile and nothing else is kept; for
// training they run once per chunk on the saved block 2 output, where their
// matrices are largest.
LeNetActivations forward(const at::Tensor& x, const LeNetParams& p, bool keep_activations, const char* op) {
  // Nothing here is differentiated, and worker threads must not reach the
  // Python autograd wrapper of the conv operator: dispatch below autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (x.size(0) <= kTile) {
    LeNetActivations r;
    conv_blocks(x, p, r);
    dense_layers(p, op, r);
    if (!keep_activations) r.block1 = r.block2 = r.fc1 = r.fc2 = at::Tensor();
    return r;
  }
  // An empty slice runs every argument check and gives every shape before
  // any thread starts.
  LeNetActivations shapes;
  conv_blocks(x.narrow(0, 0, 0), p, shapes);
  dense_layers(p, op, shapes);
  const auto batch_like = [&](const at::Tensor& t) {
    auto sizes = t.sizes().vec();
    sizes[0] = x.size(0);
    return at::empty(sizes, t.options());
  };
  LeNetActivations out;
  out.logits = batch_like(shapes.logits);
  if (keep_activations) {
    out.block1 = batch_like(shapes.block1);
    out.block2 = batch_like(shapes.block2);
    out.fc1 = batch_like(shapes.fc1);
    out.fc2 = batch_like(shapes.fc2);
  }
  for_each_chunk(x.size(0), batch_chunks(x.size(0)), [&](int64_t, int64_t begin, int64_t end) {
    for_each_tile(begin, end, [&](int64_t start, int64_t size) {
      LeNetActivations r;
      conv_blocks(x.narrow(0, start, size), p, r);
      if (keep_activations) {
        out.block1.narrow(0, start, size).copy_(r.block1);
        out.block2.narrow(0, start, size).copy_(r.block2);
        return;
      }
      dense_layers(p, op, r);
      out.logits.narrow(0, start, size).copy_(r.logits);
    });
    if (!keep_activations) return;
    LeNetActivations r;
    r.block2 = out.block2.narrow(0, begin, end - begin);
    dense_layers(p, op, r);
    out.logits.narrow(0, begin, end - begin).copy_(r.logits);
    out.fc1.narrow(0, begin, end - begin).copy_(r.fc1);
    out.fc2.narrow(0, begin, end - begin).copy_(r.fc2);
  });
  return out;
}

at::Tensor lenet_forward_cpu(const at::Tensor& x, LENET_PARAMS_ARGS) {
  const LeNetParams p = LENET_PARAMS;
  if (LeNetActivations r = forward_small_batch(x, p, /*keep_activations=*/false); r.logits.defined())
    return r.logits;
  return forward(x, p, false, "lenet_forward").logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_train_forward_cpu(
    const at::Tensor& x, LENET_PARAMS_ARGS) {
  const LeNetParams p = LENET_PARAMS;
  LeNetActivations r = forward_small_batch(x, p, /*keep_activations=*/true);
  if (!r.logits.defined()) r = forward(x, p, true, "lenet_train_forward");
  return {r.logits, r.block1, r.block2, r.fc1, r.fc2};
}

// Per-chunk gradient sums, (chunks, *parameter shape), for each parameter
// gradient asked for. The chunk's first tile writes its slot before later
// tiles add to it, so there is no zero fill (one of this size would be a
// parallel region of its own, and waiting for its threads costs more than
// the work).
LeNetGradArray chunk_sums(const LeNetParams& p, const LeNetBackwardCall& call, int64_t chunks) {
  LeNetGradArray sums;
  for (int i = kConv1W; i < kGrads; ++i) {
    if (!call.mask[i]) continue;
    const at::Tensor& param = parameter(p, LeNetGrad(i));
    auto sizes = param.sizes().vec();
    sizes.insert(sizes.begin(), chunks);
    const auto options = param.options().memory_format(at::MemoryFormat::Contiguous);
    sums[i] = at::empty(sizes, options);
  }
  return sums;
}

LeNetGrads lenet_backward_cpu(const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& block1,
                              const at::Tensor& block2, const at::Tensor& fc1, const at::Tensor& fc2,
                              LENET_PARAMS_ARGS, LeNetGradMask output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LeNetParams p = LENET_PARAMS;
  const LeNetActivations saved{.block1 = block1, .block2 = block2, .fc1 = fc1, .fc2 = fc2};
  if (std::optional<LeNetGrads> grads = backward_small_batch(grad_logits, x, saved, p, output_mask)) return *grads;
  // One tile: the layers' gradients straight into the results, with no
  // per-chunk sums to allocate, fill and add. (It checks the arguments too.)
  if (x.dim() == 0 || x.size(0) <= kTile) return lenet_backward_whole_batch(grad_logits, x, saved, p, output_mask);
  const LeNetBackwardCall call = check_backward_args(grad_logits, x, saved, p, output_mask);
  const int64_t batch = x.size(0);
  const int64_t chunks = batch_chunks(batch);
  const LeNetGradArray sums = chunk_sums(p, call, chunks);
  at::Tensor grad_x = call.mask[kX] ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();

  for_each_chunk(batch, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    const auto rows = [&](const at::Tensor& t) { return t.narrow(0, begin, end - begin); };
    LeNetGradArray slots;
    for (int i = kConv1W; i < kGrads; ++i) {
      if (call.mask[i]) slots[i] = sums[i].select(0, chunk);
    }
    // The dense layers once for the chunk, then the conv blocks tile by tile.
    const LeNetActivations chunk_saved{.block2 = rows(block2), .fc1 = rows(fc1), .fc2 = rows(fc2)};
    const at::Tensor grad_block2 = dense_backward(rows(grad_logits), chunk_saved, p, call, slots);
    if (!grad_block2.defined()) return;
    for_each_tile(begin, end, [&](int64_t start, int64_t size) {
      const auto tile = [&](const at::Tensor& t) { return t.narrow(0, start, size); };
      const at::Tensor grad_x_tile = conv_backward(
          grad_block2.narrow(0, start - begin, size), tile(block1), tile(x), p, call,
          [&](LeNetGrad i, const at::Tensor& grad) { start == begin ? slots[i].copy_(grad) : slots[i].add_(grad); });
      if (grad_x_tile.defined()) tile(grad_x).copy_(grad_x_tile);
    });
  });

  LeNetGradArray grads;
  grads[kX] = grad_x;
  for (int i = kConv1W; i < kGrads; ++i) {
    if (call.mask[i]) grads[i] = sum_partials(sums[i]);
  }
  return as_tuple(grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CPU, m) {
  m.impl("lenet_forward", &lenet_forward_cpu);
  m.impl("lenet_train_forward", &lenet_train_forward_cpu);
  m.impl("lenet_backward", &lenet_backward_cpu);
}

}  // namespace lenet_ext
