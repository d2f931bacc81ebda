// Capacity on the GPU with no host synchronisation. Two paths, chosen in one place (chunked_path):
//   chunked: 'position' or dropless with n = T·k ≤ kChunkedMaxN and E ≤ kChunkMaxExperts: chunks of
//            kChunk assignments, a block each, shared-memory counters, no atomics on ranks (see
//            capacity_chunks). One chunk (decode): one kernel. More (a training step's T·k): a
//            counting pass writes each chunk's per-expert counts, and the assigning pass adds the
//            counts of the chunks before its own. Two launches where the radix sorts took nine
//            (the layer's T·k = 32768: 32-40 µs of the step).
//   radix:   everything else ('probs' with a capacity, larger n or E): stable CUB radix sorts group
//            the assignments by expert (keeping (t, j) order inside an expert, or ordering by
//            descending weight for 'probs'), segment bounds come from comparing neighbours in the
//            sorted keys, and a slot is a position inside a segment.
// Out-of-range expert ids are skipped (slot -1, in neither kept nor dropped) and counted into
// `invalid` on both paths.
#include <cub/cub.cuh>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/common/launch.h"
#include "ops/moe/capacity/capacity.h"

namespace moe::ops {

namespace {

// Weight -> key whose ascending order is descending weight. NaN ranks as -inf and -0 as +0, like
// the CPU reference's comparison.
__device__ uint32_t descending_key(float w) {
  if (w != w) w = -INFINITY;
  if (w == 0.f) w = 0.f;
  uint32_t u = __float_as_uint(w);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~u;
}

__global__ void make_keys_position(const int32_t* idx, int64_t n, int32_t E, uint32_t* keys, int32_t* vals) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int32_t e = idx[i];
    keys[i] = (e >= 0 && e < E) ? uint32_t(e) : uint32_t(E);
    vals[i] = int32_t(i);
  }
}

__global__ void make_keys_probs(const int32_t* idx, const float* w, int64_t n, int32_t E, uint64_t* keys, int32_t* vals) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int32_t e = idx[i];
    uint64_t ek = (e >= 0 && e < E) ? uint64_t(e) : uint64_t(E);
    keys[i] = (ek << 32) | descending_key(w[i]);
    vals[i] = int32_t(i);
  }
}

template <typename K> __device__ int32_t expert_of(K key) {
  if constexpr (sizeof(K) == 8) return int32_t(key >> 32);
  else return int32_t(key);
}

// begin[e], end[e] of each expert's segment in the sorted keys (both zeroed beforehand, so an expert
// with no assignments has an empty segment).
template <typename K> __global__ void segment_bounds(const K* sorted, int64_t n, int32_t* begin, int32_t* end) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
    int32_t e = expert_of(sorted[p]);
    if (p == 0 || expert_of(sorted[p - 1]) != e) begin[e] = int32_t(p);
    if (p == n - 1 || expert_of(sorted[p + 1]) != e) end[e] = int32_t(p + 1);
  }
}

// Position policy (or dropless): the slot is the position inside the segment, if below capacity.
__global__ void assign_position(const uint32_t* sorted, const int32_t* order, int64_t n, int32_t E, int64_t cap, const int32_t* begin,
                                int32_t* slot) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
    int32_t e = int32_t(sorted[p]);
    int64_t r = e < E ? p - begin[e] : -1;
    slot[order[p]] = (r >= 0 && (cap < 0 || r < cap)) ? int32_t(r) : -1;
  }
}

// Probs policy, first pass: the first C of each weight-ordered segment are kept; the key of the
// second sort (in (t, j) order) is the expert for kept assignments and the sentinel E otherwise.
__global__ void choose_probs(const uint64_t* sorted, const int32_t* order, int64_t n, int32_t E, int64_t cap, const int32_t* begin,
                             uint32_t* keys2) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n; p += int64_t(gridDim.x) * blockDim.x) {
    int32_t e = int32_t(sorted[p] >> 32);
    bool keep = e < E && (cap < 0 || p - begin[e] < cap);
    keys2[order[p]] = keep ? uint32_t(e) : uint32_t(E);
  }
}

// kept, dropped and invalid from the first sort's segments: one block.
__global__ void finish_counts(const int32_t* begin, const int32_t* end, int32_t E, int64_t n, int64_t cap, int32_t* kept, int32_t* dropped,
                              int32_t* invalid) {
  __shared__ unsigned long long s_valid, s_dropped;
  if (threadIdx.x == 0) {
    s_valid = 0;
    s_dropped = 0;
  }
  __syncthreads();
  unsigned long long valid = 0, drop = 0;
  for (int32_t e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t count = end[e] - begin[e];
    int64_t keep = cap < 0 ? count : (count < cap ? count : cap);
    kept[e] = int32_t(keep);
    valid += (unsigned long long)count;
    drop += (unsigned long long)(count - keep);
  }
  atomicAdd(&s_valid, valid);
  atomicAdd(&s_dropped, drop);
  __syncthreads();
  if (threadIdx.x == 0) {
    dropped[0] = int32_t(s_dropped);
    invalid[0] = int32_t(n - (long long)s_valid);
  }
}

// ---------------------------------------------------------------------------- chunked path
// A block of kChunkThreads threads per chunk of kChunk assignments (the last chunk shorter). Warp w
// owns the contiguous assignments [w·seg, (w+1)·seg) of its chunk (seg a multiple of 32, at most
// 32·kChunkIters) and walks them 32 at a time in (t, j) order: __match_any_sync groups the lanes
// holding the same expert, a lane's rank is the warp's running count of its expert plus the number
// of lower lanes in its group, and the group's lowest lane then adds the group's size to that count
// (only this warp's row of the table, between __syncwarp()s). After a barrier, each expert's counts
// are turned into exclusive prefixes over the warps (in warp order), and the chunks before this one
// add their counts (chunk_counts, from the counting pass), so slot = the number of earlier
// assignments of e in (t, j) order: exact and deterministic (integer sums only, no atomics on ranks).
constexpr int kChunkThreads = 1024;
constexpr int kChunkWarps = kChunkThreads / 32;
constexpr int kChunkIters = 8;                                       // 32-assignment steps per warp: assignments a lane keeps in registers
constexpr int64_t kChunk = int64_t(kChunkWarps) * 32 * kChunkIters;  // 8192
constexpr int64_t kChunkedMaxN = 128 * kChunk;  // 2^20: block 0 of the assigning pass sums 128 chunks' counts per expert
// Table [kChunkWarps][E] of u16 (counts ≤ seg ≤ 256, prefixes ≤ kChunk = 8192) and the chunk's base
// per expert (i32: up to n): 68·E bytes of dynamic shared memory, 34 KiB at E = 512, under the 48 KiB
// a launch gets without opting in.
constexpr int64_t kChunkMaxExperts = 512;
static_assert(kChunk <= 65535, "the chunk's u16 table holds prefixes up to kChunk");
static_assert(kChunkWarps * kChunkMaxExperts * 2 + kChunkMaxExperts * 4 <= 48 * 1024 - 64, "the table and bases fit in 48 KiB");
static_assert(kChunkedMaxN <= (int64_t(1) << 30), "n and the slots fit an int32");

// COUNT: write this chunk's per-expert counts to chunk_counts[chunk][e] and stop. Otherwise assign:
// chunk_counts null means one chunk (no other counts, this block writes the totals); else block 0
// writes kept, dropped and invalid from every chunk's counts.
template <bool COUNT>
__global__ void __launch_bounds__(kChunkThreads, 1)
    capacity_chunks(const int32_t* __restrict__ idx, int32_t n, int32_t E, int32_t cap, int32_t* __restrict__ chunk_counts,
                    int32_t* __restrict__ slot, int32_t* __restrict__ kept, int32_t* __restrict__ dropped, int32_t* __restrict__ invalid) {
  extern __shared__ uint16_t s_table[];                                     // [kChunkWarps][E]: counts, then exclusive prefixes over warps
  int32_t* s_base = reinterpret_cast<int32_t*>(s_table + kChunkWarps * E);  // [E]: assignments of e in earlier chunks
  __shared__ int32_t s_valid, s_dropped;
  const int lane = int(threadIdx.x & 31), warp = int(threadIdx.x >> 5);
  const int chunk = int(blockIdx.x);
  const int begin = chunk * int(kChunk), len = min(n - begin, int(kChunk));
  // Assignments per warp: a multiple of 32, so every step of a warp is one aligned 128-byte load.
  const int seg = ((len + kChunkWarps - 1) / kChunkWarps + 31) / 32 * 32;
  const int first = begin + warp * seg, end = begin + len;
  // Loads first (all in flight together): key = expert id, or -1 for out-of-range ids and lanes past the chunk.
  int32_t key[kChunkIters];
#pragma unroll
  for (int it = 0; it < kChunkIters; ++it) {
    const int i = first + it * 32 + lane;
    int32_t e = -1;
    if (it * 32 < seg && i < end) {
      e = idx[i];
      if (e < 0 || e >= E) e = -1;
    }
    key[it] = e;
  }
  for (int i = int(threadIdx.x); i < kChunkWarps * E; i += kChunkThreads) s_table[i] = 0;
  if (threadIdx.x == 0) {
    s_valid = 0;
    s_dropped = 0;
  }
  __syncthreads();

  uint16_t* mine = s_table + warp * E;
  int32_t rank[kChunkIters];
#pragma unroll
  for (int it = 0; it < kChunkIters; ++it) {
    rank[it] = 0;
    if (it * 32 < seg) {  // the same for the whole block: every lane reaches the warp intrinsics
      const int32_t e = key[it];
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const int below = __popc(peers & ((1u << lane) - 1u));
      if (e >= 0) rank[it] = int32_t(mine[e]) + below;
      __syncwarp();
      if (e >= 0 && below == 0) mine[e] = uint16_t(mine[e] + __popc(peers));
      __syncwarp();
    }
  }
  __syncthreads();

  if constexpr (COUNT) {
    for (int32_t e = int32_t(threadIdx.x); e < E; e += kChunkThreads) {
      int32_t run = 0;
#pragma unroll 8
      for (int w = 0; w < kChunkWarps; ++w) run += s_table[w * E + e];
      chunk_counts[int64_t(chunk) * E + e] = run;
    }
    return;
  } else {
    // Per expert (E ≤ kChunkThreads: one thread each): prefixes over the warps, the chunk's base, and
    // (block 0, which writes kept, dropped and invalid) the totals over every chunk.
    const bool totals = chunk == 0;
    const int chunks = int((n + kChunk - 1) / kChunk);
    int32_t valid = 0, drop = 0;
    for (int32_t e = int32_t(threadIdx.x); e < E; e += kChunkThreads) {
      int32_t run = 0;
#pragma unroll 8
      for (int w = 0; w < kChunkWarps; ++w) {
        const int32_t c = s_table[w * E + e];
        s_table[w * E + e] = uint16_t(run);
        run += c;
      }
      int32_t base = 0, total = run;
      if (chunk_counts != nullptr) {
        total = 0;
        for (int c = 0; c < (totals ? chunks : chunk); ++c) {
          const int32_t count = chunk_counts[int64_t(c) * E + e];
          if (c < chunk) base += count;
          total += count;
        }
      }
      s_base[e] = base;
      if (totals) {
        const int32_t keep = cap < 0 ? total : min(total, cap);
        kept[e] = keep;
        valid += total;
        drop += total - keep;
      }
    }
    if (totals) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        valid += __shfl_xor_sync(0xffffffffu, valid, off);
        drop += __shfl_xor_sync(0xffffffffu, drop, off);
      }
      if (lane == 0 && (valid != 0 || drop != 0)) {
        atomicAdd(&s_valid, valid);
        atomicAdd(&s_dropped, drop);
      }
    }
    __syncthreads();

#pragma unroll
    for (int it = 0; it < kChunkIters; ++it) {
      const int i = first + it * 32 + lane;
      if (it * 32 < seg && i < end) {
        const int32_t e = key[it];
        int32_t s = -1;
        if (e >= 0) {
          const int32_t r = s_base[e] + int32_t(s_table[warp * E + e]) + rank[it];
          s = (cap < 0 || r < cap) ? r : -1;
        }
        slot[i] = s;
      }
    }
    if (totals && threadIdx.x == 0) {
      dropped[0] = s_dropped;
      invalid[0] = n - s_valid;
    }
  }
}

// The one place that picks the path: the chunked path handles 'position' and dropless (no sort by
// weight needed) when the experts fit its table and the chunks its sums.
bool chunked_path(DropPolicy policy, int64_t capacity, int64_t n, int64_t E) {
  return (policy == DropPolicy::Position || capacity < 0) && n <= kChunkedMaxN && E <= kChunkMaxExperts;
}

int bits_for(int64_t v) {  // bits needed to hold 0..v
  int b = 1;
  while ((int64_t(1) << b) <= v) ++b;
  return b;
}

}  // namespace

void capacity_cuda(const Tensor& indices, const Tensor& weights, int64_t num_experts, int64_t capacity, DropPolicy policy,
                   const Tensor& slot, const Tensor& kept, const Tensor& dropped, const Tensor& invalid, void* stream_ptr) {
  const std::string op = "capacity";
  cudaStream_t stream = cudaStream_t(stream_ptr);
  const int64_t n = indices.numel();
  const int32_t E = int32_t(num_experts);
  const Device& dev = indices.device();
  if (chunked_path(policy, capacity, n, num_experts)) {
    // Every output is written by the kernels (no memset): slot for all n, kept for all E. n = 0 is one
    // (empty) chunk, which still writes the totals.
    const size_t smem = size_t(num_experts) * (size_t(kChunkWarps) * sizeof(uint16_t) + sizeof(int32_t));
    const int chunks = int(std::max<int64_t>(1, (n + kChunk - 1) / kChunk));
    const int32_t cap = int32_t(capacity < 0 ? -1 : std::min<int64_t>(capacity, kChunkedMaxN));
    Tensor counts;
    if (chunks > 1) {
      counts = Tensor::empty({int64_t(chunks) * num_experts}, DType::i32, dev, op);
      capacity_chunks<true><<<chunks, kChunkThreads, smem, stream>>>(indices.data<int32_t>(), int32_t(n), E, cap, counts.data<int32_t>(),
                                                                     nullptr, nullptr, nullptr, nullptr);
      cuda::check_launch(op);
    }
    capacity_chunks<false><<<chunks, kChunkThreads, smem, stream>>>(indices.data<int32_t>(), int32_t(n), E, cap,
                                                                    chunks > 1 ? counts.data<int32_t>() : nullptr, slot.data<int32_t>(),
                                                                    kept.data<int32_t>(), dropped.data<int32_t>(), invalid.data<int32_t>());
    cuda::check_launch(op);
    return;
  }
  Tensor bounds = Tensor::empty({2 * (num_experts + 1)}, DType::i32, dev, op);
  int32_t* begin = bounds.data<int32_t>();
  int32_t* end = begin + (num_experts + 1);
  cuda::memset_async(begin, 0, bounds.nbytes(), stream, op);
  if (n > 0) {
    const int ebits = bits_for(num_experts);
    Tensor vals_in = Tensor::empty({n}, DType::i32, dev, op), vals_out = Tensor::empty({n}, DType::i32, dev, op);
    Tensor keys2 = Tensor::empty({n}, DType::i32, dev, op), keys2_out = Tensor::empty({n}, DType::i32, dev, op);
    uint32_t* k2 = reinterpret_cast<uint32_t*>(keys2.data<int32_t>());
    uint32_t* k2_out = reinterpret_cast<uint32_t*>(keys2_out.data<int32_t>());
    size_t temp_bytes = 0;
    auto temp_for = [&](size_t bytes) { return Tensor::empty({int64_t(bytes) + 1}, DType::u8, dev, op); };

    // Sorts the 32-bit keys k2 (values: vals_in) stably, then finds the segments.
    auto sort32 = [&]() {
      cuda::check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, k2, k2_out, vals_in.data<int32_t>(), vals_out.data<int32_t>(), n, 0,
                                                  ebits, stream),
                  op, "cub sort (size)");
      Tensor temp = temp_for(temp_bytes);
      cuda::check(cub::DeviceRadixSort::SortPairs(temp.raw(), temp_bytes, k2, k2_out, vals_in.data<int32_t>(), vals_out.data<int32_t>(), n,
                                                  0, ebits, stream),
                  op, "cub sort");
      segment_bounds<uint32_t><<<grid_for(n), kThreads, 0, stream>>>(k2_out, n, begin, end);
      cuda::check_launch(op);
    };

    if (policy == DropPolicy::Position || capacity < 0) {
      make_keys_position<<<grid_for(n), kThreads, 0, stream>>>(indices.data<int32_t>(), n, E, k2, vals_in.data<int32_t>());
      cuda::check_launch(op);
      sort32();
      assign_position<<<grid_for(n), kThreads, 0, stream>>>(k2_out, vals_out.data<int32_t>(), n, E, capacity, begin, slot.data<int32_t>());
      cuda::check_launch(op);
    } else {
      Tensor keys = Tensor::empty({n}, DType::i64, dev, op), keys_out = Tensor::empty({n}, DType::i64, dev, op);
      uint64_t* k64 = reinterpret_cast<uint64_t*>(keys.data<int64_t>());
      uint64_t* k64_out = reinterpret_cast<uint64_t*>(keys_out.data<int64_t>());
      make_keys_probs<<<grid_for(n), kThreads, 0, stream>>>(indices.data<int32_t>(), weights.data<float>(), n, E, k64,
                                                            vals_in.data<int32_t>());
      cuda::check_launch(op);
      cuda::check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, k64, k64_out, vals_in.data<int32_t>(), vals_out.data<int32_t>(), n,
                                                  0, 32 + ebits, stream),
                  op, "cub sort (size)");
      {
        Tensor temp = temp_for(temp_bytes);
        cuda::check(cub::DeviceRadixSort::SortPairs(temp.raw(), temp_bytes, k64, k64_out, vals_in.data<int32_t>(), vals_out.data<int32_t>(),
                                                    n, 0, 32 + ebits, stream),
                    op, "cub sort");
      }
      segment_bounds<uint64_t><<<grid_for(n), kThreads, 0, stream>>>(k64_out, n, begin, end);
      cuda::check_launch(op);
      choose_probs<<<grid_for(n), kThreads, 0, stream>>>(k64_out, vals_out.data<int32_t>(), n, E, capacity, begin, k2);
      cuda::check_launch(op);
      // Counts come from the first sort's segments; the second sort numbers the kept ones in (t, j) order.
      finish_counts<<<1, kThreads, 0, stream>>>(begin, end, E, n, capacity, kept.data<int32_t>(), dropped.data<int32_t>(),
                                                invalid.data<int32_t>());
      cuda::check_launch(op);
      cuda::memset_async(begin, 0, bounds.nbytes(), stream, op);
      // vals_in still holds 0..n-1 (sorts write to vals_out): the second sort runs in (t, j) order.
      sort32();
      assign_position<<<grid_for(n), kThreads, 0, stream>>>(k2_out, vals_out.data<int32_t>(), n, E, -1, begin, slot.data<int32_t>());
      cuda::check_launch(op);
      return;
    }
  }
  finish_counts<<<1, kThreads, 0, stream>>>(begin, end, E, n, capacity, kept.data<int32_t>(), dropped.data<int32_t>(),
                                            invalid.data<int32_t>());
  cuda::check_launch(op);
}

}  // namespace moe::ops
