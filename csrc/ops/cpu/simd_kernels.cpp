#include "simd_kernels.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace lenet_ext {
namespace cpu {

namespace {

struct Choice {
  const char* name;
  const SimdKernels* kernels;
  bool available;
};

bool cpu_has_avx2() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

Choice choose() {
  const char* requested = std::getenv("LENET_EXT_CPU_KERNEL");
  const bool automatic = requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0;
#if defined(__x86_64__)
  const Choice choices[] = {
      {"avx512", &avx512::kernels, cpu_has_avx512()},
      {"avx2", &avx2::kernels, cpu_has_avx2()},
      {"baseline", &baseline::kernels, true},
      {"generic", nullptr, true},
  };
#else
  const Choice choices[] = {{"baseline", &baseline::kernels, true}, {"generic", nullptr, true}};
#endif
  for (const Choice& c : choices) {
    if (automatic && c.available) return c;
    if (!automatic && std::strcmp(requested, c.name) == 0) {
      TORCH_CHECK(c.available, "LENET_EXT_CPU_KERNEL=", requested,
                  ": this CPU does not support that instruction set");
      return c;
    }
  }
  TORCH_CHECK_VALUE(false, "LENET_EXT_CPU_KERNEL=", requested,
                    ": expected one of auto, avx512, avx2, baseline, generic");
}

}  // namespace

// Read at every call (a getenv is far cheaper than any kernel), so that the
// tests can run each instruction set in one process.
const SimdKernels* selected_kernels() { return choose().kernels; }

const char* selected_kernel_name() { return choose().name; }

}  // namespace cpu
}  // namespace lenet_ext
