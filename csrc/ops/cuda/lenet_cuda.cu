// LeNet's three operators on CUDA. lenet_forward and lenet_train_forward: the
// whole forward in one launch, each thread block running the tile program of
// ../tile/lenet_forward_tile.h for a tile of images with every activation in
// shared memory; training also writes the activations lenet_backward reads.
// lenet_backward: three tile programs (../tile/lenet_backward_tile.h, conv block
// 1's backward, the dense weight gradients of ../tile/dense_weight_grads_tile.h)
// and one launch adding their partial sums (../tile/tile_partial_sums.h), as
// ../tile/lenet_backward_tile_call.cpp prepares them. LENET_EXT_CUDA_KERNEL=
// reference, float64 and sizes the programs do not take run the layers one
// by one instead (../lenet.cpp's whole-batch implementation, the conv
// operator's CUDA kernels).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_kernel_choice.h"
#include "../lenet.h"
#include "tile_program.cuh"

namespace lenet_ext {

namespace {

// Images per block for conv block 1's backward inside LeNet's: one. On an
// H100 at 8,192 images a tile of one took 434 us against 492 at two
// (scripts/tile_sweep.py): with conv1's single input channel the work per
// image is small, and a tile of one's buffers let a fourth block share each
// multiprocessor where two allow three.
constexpr int kConv1BackwardTiles[] = {1};

// The forward's activations through the tile program, or through the layers
// when it does not take the call; `train` asks for lenet_backward's too.
LeNetActivations forward_cuda(const at::Tensor& x, const LeNetParams& p, bool train) {
  const char* op = train ? "lenet_train_forward" : "lenet_forward";
  if (cuda_reference_selected() || !tile_program_fits(x, p)) return forward_whole_batch(x, p, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const LeNetTileCall call = prepare_tile_call(x, p, train, [&](const LeNetTileShape& one_image) {
    return choose_tile<LeNetTileProgram>(x.size(0), x.device().index(),
                                         [&](int images) { return retile(one_image, images).floats; });
  });
  const int tile = call.params.s.tile;
  if (tile == 0) return forward_whole_batch(x, p, op);
  if (x.size(0) > 0) launch_tile_program<LeNetTileProgram>(call.params, (x.size(0) + tile - 1) / tile);
  return call.out;
}

at::Tensor lenet_forward_cuda(const at::Tensor& x, LENET_PARAMS_ARGS) {
  return forward_cuda(x, LENET_PARAMS, /*train=*/false).logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lenet_train_forward_cuda(
    const at::Tensor& x, LENET_PARAMS_ARGS) {
  const LeNetActivations r = forward_cuda(x, LENET_PARAMS, /*train=*/true);
  return {r.logits, r.block1, r.block2, r.fc1, r.fc2};
}

LeNetGrads lenet_backward_cuda(const at::Tensor& grad_logits, const at::Tensor& x, const at::Tensor& block1,
                               const at::Tensor& block2, const at::Tensor& fc1, const at::Tensor& fc2,
                               LENET_PARAMS_ARGS, LeNetGradMask output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // out= products of tensors that may require grad
  const LeNetParams p = LENET_PARAMS;
  const LeNetActivations saved{.block1 = block1, .block2 = block2, .fc1 = fc1, .fc2 = fc2};
  if (cuda_reference_selected()) return lenet_backward_whole_batch(grad_logits, x, saved, p, output_mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto choose = [&](c10::function_ref<int(int)> floats_for) {
    return choose_tile<LeNetBackwardTileProgram>(x.size(0), x.device().index(), floats_for);
  };
  const auto choose_conv1 = [&](c10::function_ref<int(int)> floats_for) {
    return choose_tile<ConvTileBackwardProgram>(x.size(0), x.device().index(), floats_for, kConv1BackwardTiles);
  };
  LeNetBackwardTiles call =
      prepare_backward_tiles(grad_logits, x, saved, p, output_mask, kTileProgramThreads, choose, choose_conv1);
  if (call.tiles == 0) return lenet_backward_whole_batch(grad_logits, x, saved, p, output_mask);
  launch_tile_program<LeNetBackwardTileProgram>(call.params, call.tiles);
  if (call.conv1_tiles > 0) launch_tile_program<ConvTileBackwardProgram>(call.conv1_params, call.conv1_tiles);
  if (const int64_t blocks = dense_weight_grads_blocks(call.dense_params); blocks > 0)
    launch_tile_program<DenseWeightGradsProgram>(call.dense_params, blocks);
  launch_partial_sums(call.sums);
  return call.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CUDA, m) {
  m.impl("lenet_forward", &lenet_forward_cuda);
  m.impl("lenet_train_forward", &lenet_train_forward_cuda);
  m.impl("lenet_backward", &lenet_backward_cuda);
}

}  // namespace lenet_ext
