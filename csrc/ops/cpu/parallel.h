// How the CPU kernels share out the threads.
//
// at::parallel_for called inside a parallel region runs its whole range on
// the calling thread. cpu/lenet_cpu.cpp runs a chunk of the batch per thread
// and calls the conv operator from inside that region, tile by tile; a kernel
// that keeps per-chunk partial sums must then use a single chunk, as more
// would only run one after another, each with its own sums.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace lenet_ext {
namespace cpu {

// Chunks to split `items` independent items into: one per thread, or one
// inside a parallel region (see above). A fixed count, so that per-chunk
// sums, added in chunk order, do not depend on scheduling.
inline int64_t chunk_count(int64_t items) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
}

}  // namespace cpu
}  // namespace lenet_ext
