// The one CUDA kernel of every tile program (../tile/lenet_forward_tile.h,
// ../tile/conv_sigmoid_avgpool2d_tile.h, ../tile/conv_sigmoid_avgpool2d_tile_backward.h):
// a thread block per tile of images, the program's phases in turn with a
// barrier after each. A Program names its Params (whose s.floats is the
// block's shared memory), its kName, kPhases and kPhaseNames, and
// run_phase(phase, params, smem, tile_index, tid, threads);
// ../tile/tile_emulation.cpp runs the same programs on the CPU.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../cuda_kernel_choice.h"
#include "../tile/tile_common.h"
#include "../tile/tile_partial_sums.h"
#include "phase_clocks.h"

namespace lenet_ext {

// Stamp `stamp` of this block (phase_clocks.h), by thread 0 when recording.
// The thread and block indices are read again at each stamp (volatile asm
// is neither hoisted nor shared between stamps), so that nothing of it
// holds a register across the phases: the programs have none to spare.
template <int Stamps>
__device__ __forceinline__ void stamp_phase_clock(long long* phase_clocks, int stamp) {
  if (phase_clocks == nullptr) return;
  unsigned thread, block;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(thread));
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block));
  if (thread == 0) phase_clocks[int64_t(block) * Stamps + stamp] = clock64();
}

// The blocks of a Program that each multiprocessor must hold at once, which
// caps its registers: its kMinResidentBlocks, or 0 for a program that names
// none: then the compiler's own choice, as with no minimum at all (a minimum
// of 1 lets it take up to 255 registers a thread, and it does).
template <typename Program, typename = void>
struct MinResidentBlocks {
  static constexpr int value = 0;
};
template <typename Program>
struct MinResidentBlocks<Program, std::void_t<decltype(Program::kMinResidentBlocks)>> {
  static constexpr int value = Program::kMinResidentBlocks;
};

// phase_clocks: null, or the blocks' clock64() stamps (phase_clocks.h).
template <typename Program>
__global__ void __launch_bounds__(kTileProgramThreads, MinResidentBlocks<Program>::value)
    tile_program_kernel(const typename Program::Params p, long long* phase_clocks) {
  extern __shared__ __align__(16) float smem[];  // 16: the programs read float4s
  constexpr int kStamps = Program::kPhases + 1;
  stamp_phase_clock<kStamps>(phase_clocks, 0);
  for (int phase = 0; phase < Program::kPhases; ++phase) {
    Program::run_phase(phase, p, smem, blockIdx.x, threadIdx.x, blockDim.x);
    __syncthreads();
    stamp_phase_clock<kStamps>(phase_clocks, phase + 1);
  }
}

inline int multiprocessor_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// What a call asks the runtime about a Program (an allowance, an occupancy)
// is kept per device: each query costs host time on every call otherwise,
// and a small batch's step is made of host time.
//
// Allows the Program's kernel `bytes` of dynamic shared memory on the
// current device (past 48 KB a kernel must ask). The allowance only grows,
// under a lock, so that no launch finds it lowered by another thread's
// smaller one.
template <typename Program>
void allow_shared_memory(int bytes) {
  static std::mutex mutex;
  static std::map<c10::DeviceIndex, int> allowed;
  const c10::DeviceIndex device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  int& current = allowed[device];
  if (bytes <= current) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(tile_program_kernel<Program>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      bytes));
  current = bytes;
}

// How many blocks of a program, with `bytes` of shared memory each, one
// multiprocessor of the current device holds at once (registers and shared
// memory allowing).
template <typename Program>
int resident_blocks(int bytes) {
  static std::mutex mutex;
  static std::map<std::pair<c10::DeviceIndex, int>, int> known;
  const std::pair<c10::DeviceIndex, int> key{c10::cuda::current_device(), bytes};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto found = known.find(key); found != known.end()) return found->second;
  }
  allow_shared_memory<Program>(bytes);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, tile_program_kernel<Program>,
                                                               kTileProgramThreads, bytes));
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(key, blocks);
  return blocks;
}

// Images per block for a Program: the first of `candidates` (its
// kTileCandidates unless the caller names others) whose buffers, floats_for(tile) floats, fit one block's
// shared memory while the batch still gives every multiprocessor two
// blocks, and that leaves room for two resident blocks per multiprocessor:
// with one, every barrier idles the multiprocessor until the block's slowest
// warp arrives; else the first that fits and fills. A tile asked for
// (LENET_EXT_CUDA_TILE) replaces the rule: it, or the largest half of it
// that fits. 0 when not even one image fits.
template <typename Program, typename FloatsFor>
int choose_tile(int64_t batch, c10::DeviceIndex device, const FloatsFor& floats_for,
                c10::ArrayRef<int> candidates = Program::kTileCandidates) {
  int max_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const auto fits = [&](int tile) { return int64_t(floats_for(tile)) * int64_t(sizeof(float)) <= max_bytes; };
  if (const int requested = requested_cuda_tile(); requested > 0) {
    for (int tile = requested; tile >= 1; tile /= 2) {
      if (fits(tile)) return tile;
    }
    return 0;
  }
  const int64_t multiprocessors = multiprocessor_count(device);
  int first_fitting = 0;
  for (const int tile : candidates) {
    const int64_t bytes = int64_t(floats_for(tile)) * int64_t(sizeof(float));
    const bool fills_gpu = tile == 1 || (batch + tile - 1) / tile >= 2 * multiprocessors;
    if (!fits(tile) || !fills_gpu) continue;
    if (first_fitting == 0) first_fitting = tile;
    if (resident_blocks<Program>(static_cast<int>(bytes)) >= 2) return tile;
  }
  return first_fitting;
}

// Launches a program over `tiles` blocks on the current stream.
template <typename Program>
void launch_tile_program(const typename Program::Params& p, int64_t tiles) {
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "lenet_ext: ", tiles, " tiles exceed a CUDA grid");
  const int bytes = p.s.floats * static_cast<int>(sizeof(float));
  allow_shared_memory<Program>(bytes);
  long long* clocks = phase_clock_buffer(Program::kName, Program::kPhaseNames, Program::kPhases, tiles);
  tile_program_kernel<Program>
      <<<static_cast<unsigned>(tiles), kTileProgramThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(p, clocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the passes of a plan_partial_sums plan, in order, on the current stream.
template <typename Plan>
void launch_partial_sums(const Plan& plan) {
  for (size_t i = 0; i < plan.passes.size(); ++i) launch_tile_program<PartialSumsProgram>(plan.passes[i], plan.blocks[i]);
}

}  // namespace lenet_ext
