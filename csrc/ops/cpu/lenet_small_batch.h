// lenet_forward for a batch of a few images, on the calling thread, with no
// ATen call between the layers: at batch 1 the dispatches, allocations and
// BLAS set-up of the layer-by-layer path cost more than the arithmetic.
// The conv blocks run the vectorised kernels of simd/, the dense layers
// simd/dense.h; every activation stays in a per-thread buffer.
#pragma once

#include <ATen/core/Tensor.h>

#include "../lenet.h"

namespace lenet_ext {

// Batches up to this size take the path; larger ones gain more from
// splitting across threads and from BLAS than they lose to its set-up
// (measured on 2 threads: 30.7 against 47.9 us at batch 2, 56.3 against
// 52.9 us at batch 4).
constexpr int64_t kSmallBatch = 3;

// The logits, or an undefined tensor when the path does not take the call
// (not float32, batch 0 or over kSmallBatch, the generic kernels selected,
// or sizes the vectorised kernels do not take). Bad arguments raise the
// errors the layer-by-layer path raises.
at::Tensor forward_small_batch(const at::Tensor& x, const LeNetParams& p);

}  // namespace lenet_ext
