#include "phase_clocks.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

namespace lenet_ext {

namespace {

struct Recorded {
  PhaseClocks clocks;  // stamps empty until taken
  int device;
  long long* buffer;
};

std::atomic<bool> recording{false};
std::mutex mutex;
std::vector<Recorded> recorded;

}  // namespace

void record_phase_clocks(bool on) { recording.store(on, std::memory_order_release); }

long long* phase_clock_buffer(const char* program, const char* const* phase_names, int phases, int64_t tiles) {
  if (!recording.load(std::memory_order_acquire)) return nullptr;
  Recorded r{{program, std::vector<std::string>(phase_names, phase_names + phases), tiles, {}}, 0, nullptr};
  const size_t bytes = static_cast<size_t>(tiles) * (phases + 1) * sizeof(long long);
  C10_CUDA_CHECK(cudaGetDevice(&r.device));
  C10_CUDA_CHECK(cudaMalloc(&r.buffer, bytes));
  C10_CUDA_CHECK(cudaMemset(r.buffer, 0, bytes));
  C10_CUDA_CHECK(cudaDeviceSynchronize());  // the memset done before the launch, on whatever stream it runs
  const std::lock_guard<std::mutex> lock(mutex);
  recorded.push_back(std::move(r));
  return recorded.back().buffer;
}

std::vector<PhaseClocks> take_phase_clocks() {
  std::vector<Recorded> taken;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    taken.swap(recorded);
  }
  std::vector<PhaseClocks> out;
  if (taken.empty()) return out;  // without a device query: callers may have no GPU
  int current = 0;
  C10_CUDA_CHECK(cudaGetDevice(&current));
  for (Recorded& r : taken) {
    r.clocks.stamps.resize(static_cast<size_t>(r.clocks.tiles) * (r.clocks.phases.size() + 1));
    C10_CUDA_CHECK(cudaSetDevice(r.device));
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    C10_CUDA_CHECK(cudaMemcpy(r.clocks.stamps.data(), r.buffer, r.clocks.stamps.size() * sizeof(long long),
                              cudaMemcpyDeviceToHost));
    C10_CUDA_CHECK(cudaFree(r.buffer));
    out.push_back(std::move(r.clocks));
  }
  C10_CUDA_CHECK(cudaSetDevice(current));
  return out;
}

}  // namespace lenet_ext
