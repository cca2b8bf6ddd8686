#include "cuda_kernel_choice.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace lenet_ext {

namespace {

// LENET_EXT_CUDA_KERNEL, or what select_cuda_kernel set.
std::atomic<int> cuda_kernel_choice{-1};  // -1: not read yet; 0: fused; 1: reference

int parse_cuda_kernel(const char* name, const char* source) {
  if (name == nullptr || *name == '\0' || std::strcmp(name, "fused") == 0) return 0;
  if (std::strcmp(name, "reference") == 0) return 1;
  TORCH_CHECK_VALUE(false, source, "=", name, ": expected fused or reference");
}

// LENET_EXT_CUDA_TILE, or what select_cuda_tile set.
std::atomic<int> cuda_tile_choice{-1};  // -1: not read yet; 0: auto; else images per block

int parse_cuda_tile(const char* tile, const char* source) {
  if (tile == nullptr || *tile == '\0' || std::strcmp(tile, "auto") == 0) return 0;
  char* end = nullptr;
  const long images = std::strtol(tile, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && images >= 1 && images <= kMaxRequestedTile, source, "=", tile,
                    ": expected auto or a number of images per block from 1 to ", kMaxRequestedTile);
  return static_cast<int>(images);
}

}  // namespace

bool cuda_reference_selected() {
  int choice = cuda_kernel_choice.load(std::memory_order_acquire);
  if (choice < 0) {
    choice = parse_cuda_kernel(std::getenv("LENET_EXT_CUDA_KERNEL"), "LENET_EXT_CUDA_KERNEL");
    cuda_kernel_choice.store(choice, std::memory_order_release);
  }
  return choice == 1;
}

void select_cuda_kernel(const char* name) {
  cuda_kernel_choice.store(parse_cuda_kernel(name, "cuda_kernel"), std::memory_order_release);
}

int requested_cuda_tile() {
  int choice = cuda_tile_choice.load(std::memory_order_acquire);
  if (choice < 0) {
    choice = parse_cuda_tile(std::getenv("LENET_EXT_CUDA_TILE"), "LENET_EXT_CUDA_TILE");
    cuda_tile_choice.store(choice, std::memory_order_release);
  }
  return choice;
}

void select_cuda_tile(const char* tile) {
  cuda_tile_choice.store(parse_cuda_tile(tile, "cuda_tile"), std::memory_order_release);
}

}  // namespace lenet_ext
