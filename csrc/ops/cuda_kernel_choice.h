// Which CUDA kernels the operators run: the tile programs ("fused", the
// default: lenet_forward_tile.h, conv_sigmoid_avgpool2d_tile.h) or the simple
// one-thread-per-output kernels ("reference"), which the fast ones are tested
// against. LENET_EXT_CUDA_KERNEL, read once, picks one; select_cuda_kernel
// switches it (for tests).
#pragma once

namespace lenet_ext {

bool cuda_reference_selected();
void select_cuda_kernel(const char* name);

}  // namespace lenet_ext
