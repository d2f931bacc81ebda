// Capacity: which router assignments each expert keeps, and where they go in its kept list.
//
// Naming: T tokens, k experts per token, E experts, N = T·k assignments in (t, j) order,
// C = capacity per expert (the caller computes C = ceil(cf·T·k/E); C < 0 means unlimited).
//
//   indices [T,k] i32   expert id of assignment (t, j); distinct within a row (not checked)
//   weights [T,k] f32   gate weight; needed by the 'probs' policy only (may be undefined for 'position')
// outputs (all i32, contiguous, on the same device):
//   slot    [T,k]       position of (t, j) in its expert's kept list, 0..C-1, or -1 when dropped.
//                       Kept assignments of an expert are numbered in (t, j) order, whichever policy
//                       chose them.
//   kept    [E]         kept assignments per expert (≤ C)
//   dropped [1]         assignments dropped for capacity
//   invalid [1]         assignments whose expert id is outside [0, E). The CPU path throws for these
//                       instead; the CUDA path skips them (slot -1, not counted in kept or dropped)
//                       and counts them here, so the caller can check without a sync on the hot path.
//
// Policies: Probs keeps each expert's C highest-weight assignments (ties and NaN: a NaN weight ranks
// as -inf; equal weights keep the earlier (t, j)); Position keeps the earliest C in (t, j) order.
// The CUDA path makes no host synchronisation: 'position' and dropless with T·k ≤ 8192 and E ≤ 512
// run as one single-block kernel; everything else as stable CUB radix sorts + small kernels (cuda.cu).
#pragma once
#include "core/tensor.h"

namespace moe::ops {

enum class DropPolicy : int { Probs = 0, Position = 1 };

void capacity(const Tensor& indices, const Tensor& weights, int64_t num_experts, int64_t capacity, DropPolicy policy, const Tensor& slot,
              const Tensor& kept, const Tensor& dropped, const Tensor& invalid);

void capacity_cpu(const Tensor& indices, const Tensor& weights, int64_t num_experts, int64_t capacity, DropPolicy policy,
                  const Tensor& slot, const Tensor& kept, const Tensor& dropped, const Tensor& invalid);
void capacity_cuda(const Tensor& indices, const Tensor& weights, int64_t num_experts, int64_t capacity, DropPolicy policy,
                   const Tensor& slot, const Tensor& kept, const Tensor& dropped, const Tensor& invalid, void* stream);

}  // namespace moe::ops
