// Which CUDA kernels the operators run: the tile programs ("fused", the
// default: tile/lenet_forward_tile.h, tile/conv_sigmoid_avgpool2d_tile.h) or the simple
// one-thread-per-output kernels ("reference"), which the fast ones are tested
// against. LENET_EXT_CUDA_KERNEL, read once, picks one; select_cuda_kernel
// switches it (for tests).
//
// And how many images a tile program's thread block takes: "auto" (the
// default) lets choose_tile (cuda/tile_program.cuh) decide for each call; a
// number asks for that many, or the largest half of it whose buffers fit
// shared memory. LENET_EXT_CUDA_TILE, read once, or select_cuda_tile sets
// it: scripts/tile_sweep.py times each program at each tile with it.
#pragma once

namespace lenet_ext {

bool cuda_reference_selected();
void select_cuda_kernel(const char* name);

// 0 for auto, else the images per block asked for (1 to kMaxRequestedTile).
constexpr int kMaxRequestedTile = 64;
int requested_cuda_tile();
void select_cuda_tile(const char* tile);

}  // namespace lenet_ext
