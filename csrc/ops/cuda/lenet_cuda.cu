// lenet_forward on CUDA: the whole inference in one launch. Each thread block
// runs the tile program of ../lenet_forward_tile.h for a tile of images, with
// every activation in shared memory. LENET_EXT_CUDA_KERNEL=reference, float64
// and sizes the program does not take run the layers one by one instead
// (../lenet.cpp's whole-batch implementation, the conv operator's CUDA kernels).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda_kernel_choice.h"
#include "../lenet.h"

namespace lenet_ext {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) lenet_forward_kernel(const LeNetTileParams p) {
  extern __shared__ __align__(16) float smem[];  // 16: the conv weights are read in float4s
  for (int phase = 0; phase < kLeNetTilePhases; ++phase) {
    lenet_tile_phase(phase, p, smem, blockIdx.x, threadIdx.x, blockDim.x);
    __syncthreads();
  }
}

at::Tensor lenet_forward_cuda(const at::Tensor& x, LENET_PARAMS_ARGS) {
  const LeNetParams p = LENET_PARAMS;
  if (cuda_reference_selected() || !tile_program_fits(x, p)) {
    return forward_whole_batch(x, p, "lenet_forward").logits;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  LeNetTileCall call = prepare_tile_call(x, p, 1);
  int max_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  // The largest tile whose buffers fit one block's shared memory.
  int tile = 8;
  while (tile > 1 && retile(call.params.s, tile).floats * int64_t(sizeof(float)) > max_bytes) tile /= 2;
  call.params.s = retile(call.params.s, tile);
  const int64_t bytes = call.params.s.floats * int64_t(sizeof(float));
  if (bytes > max_bytes) return forward_whole_batch(x, p, "lenet_forward").logits;
  if (x.size(0) == 0) return call.logits;
  // Past 48 KB a kernel must ask for its shared memory.
  C10_CUDA_CHECK(cudaFuncSetAttribute(lenet_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  const int64_t tiles = (x.size(0) + tile - 1) / tile;
  lenet_forward_kernel<<<static_cast<unsigned>(tiles), kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      call.params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CUDA, m) {
  m.impl("lenet_forward", &lenet_forward_cuda);
}

}  // namespace lenet_ext
