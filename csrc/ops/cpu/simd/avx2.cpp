// The vectorised CPU kernels built for AVX2 with FMA.
// Headers come before the target pragma, so that only these kernels use the
// wider instructions; selected_kernels() calls them only where the CPU has them.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd_kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#define LENET_ISA avx2
#include "entry_points.h"
#endif
