// Capacity on the GPU with no host synchronisation: stable CUB radix sorts group the assignments by
// expert (keeping (t, j) order inside an expert, or ordering by descending weight for 'probs'),
// segment bounds come from comparing neighbours in the sorted keys, and a slot is a position inside
// a segment. Out-of-range expert ids sort into a sentinel segment E and are counted into `invalid`.
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
