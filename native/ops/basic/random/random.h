// Seeded random fill: element i of `out` is drawn from counter (offset + i) of the Philox stream
// `seed`, so the result does not depend on the device or on how the work is split.
//   uniform: lo + (hi - lo) * u, u in [0, 1)
//   normal:  mean + std * z, z from Box-Muller on two uniforms of the same counter
#pragma once
#include <cstdint>
#include "core/tensor.h"

namespace moe::ops {

enum class RandomKind : int { Uniform = 0, Normal = 1 };

struct RandomParams {
  RandomKind kind;
  float p0, p1;  // (lo, hi) or (mean, std)
  uint64_t seed, offset;
};

void random_fill(const Tensor& out, const RandomParams& params);

void random_cpu(const Tensor& out, const RandomParams& params);
void random_cuda(const Tensor& out, const RandomParams& params, void* stream);

}  // namespace moe::ops
