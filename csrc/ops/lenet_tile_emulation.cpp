// The tile program of lenet_forward_tile.h run on the CPU, thread by thread
// and phase by phase, as the operator lenet_ext::_lenet_forward_tile_emulated
// (for the tests: tests/test_lenet_tile_program.py). It checks the program's
// index math, its shared-memory layout and its partial last tile without a
// GPU; the same phase functions are the CUDA kernel's.
//
// Each phase runs twice, its threads in opposite orders, on two copies of the
// shared memory: if any thread of a phase reads what another thread writes in
// the same phase, or two threads write one place, the copies differ and the
// call fails. That is the race a barrier would have to prevent. What this
// cannot see: races on global memory, and the GPU's own rules (coalescing,
// bank conflicts, occupancy), which the GPU run and compute-sanitizer cover.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lenet.h"

TORCH_LIBRARY_FRAGMENT(lenet_ext, m) {
  m.def("_lenet_forward_tile_emulated(Tensor x, " LENET_PARAMS_SCHEMA ", int tile, int threads) -> Tensor");
}

namespace lenet_ext {

namespace {

at::Tensor lenet_forward_tile_emulated(const at::Tensor& x, LENET_PARAMS_ARGS, int64_t tile, int64_t threads) {
  const LeNetParams p = LENET_PARAMS;
  TORCH_CHECK_VALUE(tile >= 1 && threads >= 1, "_lenet_forward_tile_emulated: expected tile and threads >= 1");
  TORCH_CHECK_TYPE(tile_program_fits(x, p), "_lenet_forward_tile_emulated: the tile program takes float32 only");
  LeNetTileCall call = prepare_tile_call(x, p, static_cast<int>(tile));
  const LeNetTileParams& params = call.params;
  const int64_t tiles = (x.size(0) + tile - 1) / tile;
  std::vector<float> smem(params.s.floats), reversed(params.s.floats);
  for (int64_t t = 0; t < tiles; ++t) {
    // Whatever a previous block left behind; the program must not read it.
    std::fill(smem.begin(), smem.end(), std::nanf(""));
    for (int phase = 0; phase < kLeNetTilePhases; ++phase) {
      reversed = smem;
      for (int tid = static_cast<int>(threads) - 1; tid >= 0; --tid)
        lenet_tile_phase(phase, params, reversed.data(), t, tid, static_cast<int>(threads));
      for (int tid = 0; tid < threads; ++tid)
        lenet_tile_phase(phase, params, smem.data(), t, tid, static_cast<int>(threads));
      TORCH_CHECK(std::memcmp(smem.data(), reversed.data(), smem.size() * sizeof(float)) == 0,
                  "_lenet_forward_tile_emulated: phase ", phase, " depends on the order of its threads");
    }
  }
  return call.logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(lenet_ext, CPU, m) {
  m.impl("_lenet_forward_tile_emulated", &lenet_forward_tile_emulated);
}

}  // namespace lenet_ext
