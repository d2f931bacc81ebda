// Launch helpers for the CUDA side of ops (included from .cu files only).
#pragma once
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>

namespace moe::ops {

constexpr int kThreads = 256;

// Enough blocks for a grid-stride loop to cover n items without launching millions of blocks.
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  int64_t blocks = (n + threads - 1) / threads;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

}  // namespace moe::ops
