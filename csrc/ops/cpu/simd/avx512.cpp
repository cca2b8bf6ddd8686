// The vectorised CPU kernels built for AVX-512.
// Headers come before the target pragma, so that only these kernels use the
// wider instructions; selected_kernels() calls them only where the CPU has them.
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "simd_kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
// GCC's AVX-512 intrinsics make their "undefined" operands as
// `__m512 __Y = __Y;`, which -W(maybe-)uninitialized reports wherever one is
// inlined; the value is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define LENET_ISA avx512
#define LENET_SIMD_AVX512 1  // exp and sigmoid use AVX-512 intrinsics
#include "entry_points.h"
#endif
