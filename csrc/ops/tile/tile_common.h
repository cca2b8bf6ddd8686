// What every tile program uses: unrolled loops, the index walk of a
// thread's work items, 16-byte loads and stores of shared and global memory,
// the sigmoid, and a tile's real images. __host__ __device__ like the
// programs, so that the CPU emulation (tile_emulation.cpp) runs the same
// code; there the vector accesses check their alignment, as the GPU would
// fault on a misaligned one.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "../conv_sigmoid_avgpool2d_math.h"

namespace lenet_ext {

// The threads of every tile program's block (../cuda/tile_program.cuh
// launches them), which the layouts size their phases' items for.
constexpr int kTileProgramThreads = 256;

// Loops over a thread's few values (a channel group, a dense row's four
// inputs) unrolled on the GPU, so that its arrays live in registers, not in
// local memory.
#if defined(__CUDA_ARCH__)
#define LENET_UNROLL _Pragma("unroll")
#else
#define LENET_UNROLL
#endif

// A thread's items i = first, first + stride, ... of a phase as coordinates
// of a grid, coord[0] the outermost, coord[l] < sizes[l] for l > 0: each step
// adds the stride's own coordinates with carries, where dividing i by sizes
// known only at run time would cost the GPU about twenty instructions per
// division and item.
template <int Levels>
struct IndexWalk {
  int coord[Levels], step[Levels], size[Levels];

  LENET_HOST_DEVICE IndexWalk(int first, int stride, const int (&sizes)[Levels]) {
    LENET_UNROLL
    for (int l = Levels - 1; l > 0; --l) {
      size[l] = sizes[l];
      coord[l] = first % size[l], first /= size[l];
      step[l] = stride % size[l], stride /= size[l];
    }
    size[0] = 0, coord[0] = first, step[0] = stride;
  }

  LENET_HOST_DEVICE void advance() {
    int carry = 0;
    LENET_UNROLL
    for (int l = Levels - 1; l > 0; --l) {
      coord[l] += step[l] + carry;  // below 2 * size[l]: one carry at most
      carry = coord[l] >= size[l] ? 1 : 0;
      coord[l] -= carry * size[l];
    }
    coord[0] += step[0] + carry;
  }
};

#if !defined(__CUDA_ARCH__)
// The GPU faults on a misaligned vector access; the CPU emulation of the
// programs (tile_emulation.cpp) stops there too, so that its tests catch it.
inline void check_vector_alignment(const void* p, int bytes = 16) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0)
    throw std::logic_error("lenet_ext: a tile program's vector access is misaligned");
}
#endif

// Four floats at p, 16-byte aligned: one vector load on the GPU (a channel
// group's weights of one tap or dL/dz at one position, four inputs of a
// dense row).
LENET_HOST_DEVICE void load4(const float* p, float (&out)[4]) {
#if defined(__CUDA_ARCH__)
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
#else
  check_vector_alignment(p);
  for (int c = 0; c < 4; ++c) out[c] = p[c];
#endif
}

// Two floats at p, 8-byte aligned: one vector load on the GPU.
LENET_HOST_DEVICE void load2(const float* p, float (&out)[2]) {
#if defined(__CUDA_ARCH__)
  const float2 v = *reinterpret_cast<const float2*>(p);
  out[0] = v.x, out[1] = v.y;
#else
  check_vector_alignment(p, 8);
  for (int c = 0; c < 2; ++c) out[c] = p[c];
#endif
}

// Four floats to p, 16-byte aligned: one vector store on the GPU.
LENET_HOST_DEVICE void store4(float* p, const float (&in)[4]) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
#else
  check_vector_alignment(p);
  for (int c = 0; c < 4; ++c) p[c] = in[c];
#endif
}

// Four floats from `from` to `to`, or four zeros unless `load` (`from` is
// then not read), both 16-byte aligned: one vector load and one vector store
// on the GPU, where loading into an array and storing it with store4 leaves
// the compiler four scalar stores.
LENET_HOST_DEVICE void copy4_or_zeros(const float* from, bool load, float* to) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(to) = load ? *reinterpret_cast<const float4*>(from) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#else
  float quad[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (load) load4(from, quad);
  store4(to, quad);
#endif
}

// The tile programs' sigmoid, 1 / (1 + exp(-z)) with the reciprocal
// correctly rounded, as the division rounds it, for z >= -87; below, where
// the sigmoid is under 1.7e-38, it is 0. On the GPU the reciprocal is the
// approximation refined by one Newton step, which is how the compiler's own
// division computes it when the divisor's exponent is not extreme; a
// division would also test for that case and branch to a slow path: about
// ten more instructions per sigmoid, and a divergent region around each.
LENET_HOST_DEVICE float tile_sigmoid(float z) {
  const float d = 1.0f + expf(-z);  // below 6.1e37 for z >= -87: 1 / d stays a normal float
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  r = fmaf(r, -fmaf(d, r, -1.0f), r);
#else
  const float r = 1.0f / d;
#endif
  return z < -87.0f ? 0.0f : r;
}

// Host side: the shared-memory offsets (in floats) of a program's buffers,
// handed out in order, each in whole groups of four floats from a 16-byte
// boundary, as the programs' four-float accesses need.
struct AlignedBuffers {
  int end;  // the floats handed out so far, a multiple of four
  explicit AlignedBuffers(int from) : end((from + 3) / 4 * 4) {}
  int take(int floats) {
    const int start = end;
    end += (floats + 3) / 4 * 4;
    return start;
  }
};

// The real images of the tile whose first image is `first` (the last tile
// of a batch may be partial).
LENET_HOST_DEVICE int tile_images(int64_t batch, int64_t first, int tile) {
  return batch - first < tile ? static_cast<int>(batch - first) : tile;
}

}  // namespace lenet_ext
