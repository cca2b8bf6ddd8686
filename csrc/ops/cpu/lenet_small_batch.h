// LeNet's three operators for a batch of a few images with no ATen call
// between the layers: at batch 1 the dispatches, allocations and BLAS set-up
// of the layer-by-layer path cost more than the arithmetic. The conv blocks
// run the vectorised kernels of simd/, the dense layers simd/dense.h;
// activations and gradients stay in per-thread buffers (small_batch_state.h),
// or for training go to the tensors lenet_backward reads. Threads, when free,
// share the images.
//
//   lenet_forward, lenet_train_forward   lenet_small_batch.cpp
//   lenet_backward                       lenet_small_batch_backward.cpp
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../lenet.h"

namespace lenet_ext {

// Batches up to this size, one of lenet_cpu.cpp's tiles, take the path: one
// parallel region for the whole call, where the layer-by-layer path pays for
// a region, a dispatch and an allocation per layer. Measured on 2 threads
// (operator alone, this path against the layer-by-layer one): lenet_forward
// at batch 4 33 against 52 us, at 33 204 against 228 us, at 64 379 against
// 398 us; lenet_backward at batch 8 195 against 248 us, at 33 500 against
// 535 us, at 64 892 against 927 us. On one thread the two paths are equal
// within 2% at 33 and 64. Over 64 the two paths come within a few percent
// of each other (equal within the noise at 128 and 256), and only the tiles
// keep a tile's activations in cache at any batch size.
constexpr int64_t kSmallBatch = 64;

// The logits, and with keep_activations the activations lenet_backward reads
// (lenet_train_forward); logits undefined when the path does not take the
// call (not float32, batch 0 or over kSmallBatch, the generic kernels
// selected, or sizes the vectorised kernels do not take). Bad arguments
// raise the errors the layer-by-layer path raises.
LeNetActivations forward_small_batch(const at::Tensor& x, const LeNetParams& p, bool keep_activations);

// lenet_backward's gradients, or nullopt when the path does not take the
// call (as above). Bad arguments raise lenet_backward's errors.
std::optional<LeNetGrads> backward_small_batch(const at::Tensor& grad_logits, const at::Tensor& x,
                                               const LeNetActivations& saved, const LeNetParams& p,
                                               const LeNetGradMask& output_mask);

}  // namespace lenet_ext
