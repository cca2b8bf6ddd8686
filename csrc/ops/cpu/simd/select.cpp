#include "simd_kernels.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace lenet_ext {
namespace cpu {

namespace {

// Instruction-set levels, in the order ATEN_CPU_CAPABILITY names them.
enum Level { kGeneric, kBaseline, kAvx2, kAvx512 };

struct Choice {
  const char* name;
  const SimdKernels* kernels;  // nullptr: the generic scalar kernels
  Level level;
};

// Widest first: the automatic choice is the first one allowed.
#if defined(__x86_64__)
const Choice kChoices[] = {
    {"avx512", &avx512::kernels, kAvx512},
    {"avx2", &avx2::kernels, kAvx2},
    {"baseline", &baseline::kernels, kBaseline},
    {"generic", nullptr, kGeneric},
};
#else
const Choice kChoices[] = {{"baseline", &baseline::kernels, kBaseline}, {"generic", nullptr, kGeneric}};
#endif

bool cpu_supports(Level level) {
#if defined(__x86_64__)
  if (level == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  if (level == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return level <= kBaseline;
}

// ATEN_CPU_CAPABILITY caps ATen's own kernels (default, avx2, avx512); ours
// follow the same cap, so that one setting rules out an instruction set for
// the whole process. Other values leave the choice uncapped, as in ATen.
Level capability_cap() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap == nullptr) return kAvx512;
  if (std::strcmp(cap, "default") == 0) return kBaseline;
  if (std::strcmp(cap, "avx2") == 0) return kAvx2;
  return kAvx512;
}

// The choice `requested` names (auto or empty: the widest allowed); `source`
// says where the name came from, for the error message.
const Choice* find(const char* requested, const char* source) {
  const bool automatic = requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0;
  const Level cap = capability_cap();
  for (const Choice& c : kChoices) {
    if (automatic) {
      if (c.level <= cap && cpu_supports(c.level)) return &c;
      continue;
    }
    if (std::strcmp(requested, c.name) != 0) continue;
    TORCH_CHECK(cpu_supports(c.level), source, "=", requested,
                ": this CPU does not support that instruction set");
    TORCH_CHECK(c.level <= cap, source, "=", requested, ": ATEN_CPU_CAPABILITY=",
                std::getenv("ATEN_CPU_CAPABILITY"), " rules out that instruction set");
    return &c;
  }
  std::string names = "auto";
  for (const Choice& c : kChoices) names += std::string(", ") + c.name;
  TORCH_CHECK_VALUE(false, source, "=", requested, ": expected one of ", names);
}

// Set once from the environment, on the first call that needs it, or by
// select_kernel. Every thread that races on the first call computes the same
// choice, so a plain atomic store is enough.
std::atomic<const Choice*> current_choice{nullptr};

const Choice& selected() {
  const Choice* c = current_choice.load(std::memory_order_acquire);
  if (c == nullptr) {
    // A bad value throws here and is read again on the next call.
    c = find(std::getenv("LENET_EXT_CPU_KERNEL"), "LENET_EXT_CPU_KERNEL");
    current_choice.store(c, std::memory_order_release);
  }
  return *c;
}

}  // namespace

const SimdKernels* selected_kernels() { return selected().kernels; }

const char* selected_kernel_name() { return selected().name; }

void select_kernel(const char* name) {
  current_choice.store(find(name, "cpu_kernel"), std::memory_order_release);
}

}  // namespace cpu
}  // namespace lenet_ext
