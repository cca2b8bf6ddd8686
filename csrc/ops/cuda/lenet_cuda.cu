// lenet_forward and lenet_train_forward on CUDA: the whole forward in one
// launch. Each thread block runs the tile program of ../lenet_forward_tile.h
// for a tile of images, with every activation in shared memory; training
// also writes the activations lenet_backward reads. LENET_EXT_CUDA_KERNEL=
// reference, float64 and sizes the program does not take run the layers one
// by one instead (../lenet.cpp's whole-batch implementation, the conv
// operator's CUDA kernels). lenet_backward is the whole-batch one: the conv
// operator's backward per block, the dense layers through cuBLAS.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_kernel_choice.h"
#include "../lenet.h"
#include "tile_program.cuh"

namespace lenet_ext {

namespace {

// The forward's activations through the tile program, or through the layers
// when it does not take the call; `train` asks for lenet_backward's too.
LeNetActivations forward_cuda(const at::Tensor& x, const LeNetParams& p, bool train) {
  const char* op = train ? "lenet_train_forward" : "lenet_forward";
  if (cuda_reference_selected() || !tile_program_fits(x, p)) return forward_whole_batch(x, p, op);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const LeNetTileCall call = prepare_tile_call(x, p, train, [&](const LeNetTileShape& one_image) {
    return choose_tile(x.size(0), x.device().index(), [&](int images) { return retile(one_image, images).floats; });
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

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CUDA, m) {
  m.impl("lenet_forward", &lenet_forward_cuda);
  m.impl("lenet_train_forward", &lenet_train_forward_cuda);
}

}  // namespace lenet_ext
