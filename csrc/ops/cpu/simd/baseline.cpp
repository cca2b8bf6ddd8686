// The vectorised CPU kernels built for the build's baseline instruction set (SSE2 on x86-64).
// Headers come before the target pragma, so that only these kernels use the
// wider instructions; selected_kernels() calls them only where the CPU has them.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd_kernels.h"

#define LENET_ISA baseline
#include "entry_points.h"
