#include <cfloat>
#include <climits>

#include "core/cuda_runtime.h"
#include "ops/basic/reduce/reduce.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"

namespace moe::ops {

template <typename Acc> struct Reducer {
  ReduceOp kind;
  __device__ Acc identity() const {
    if constexpr (IsFloating<Acc>::value) return kind == ReduceOp::Sum ? Acc(0) : -INFINITY;
    else return kind == ReduceOp::Sum ? Acc(0) : Acc(LLONG_MIN);
  }
  __device__ Acc combine(Acc x, Acc y) const {
    if (kind == ReduceOp::Sum) return x + y;
    if constexpr (IsFloating<Acc>::value) {
      if (x != x || y != y) return NAN;
    }
    return x > y ? x : y;
  }
};

template <typename I> __device__ auto load_acc(I v) {
  if constexpr (IsFloating<I>::value) return to_float(v);
  else return int64_t(v);
}

// inner == 1: one block per row, a tree reduction through shared memory.
template <typename I, typename O, typename Acc> __global__ void reduce_rows(Reducer<Acc> r, const I* a, int64_t n, O* out) {
  __shared__ Acc partial[kThreads];
  const I* row = a + blockIdx.x * n;
  Acc acc = r.identity();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) acc = r.combine(acc, Acc(load_acc(row[j])));
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] = r.combine(partial[threadIdx.x], partial[threadIdx.x + s]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = convert<O>(partial[0]);
}

// inner > 1: one thread per output element; neighbouring threads read neighbouring columns.
template <typename I, typename O, typename Acc>
__global__ void reduce_columns(Reducer<Acc> r, const I* a, int64_t outer, int64_t n, int64_t inner, O* out) {
  int64_t total = outer * inner;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t o = idx / inner, k = idx % inner;
    Acc acc = r.identity();
    for (int64_t j = 0; j < n; ++j) acc = r.combine(acc, Acc(load_acc(a[(o * n + j) * inner + k])));
    out[idx] = convert<O>(acc);
  }
}

void reduce_cuda(ReduceOp kind, const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& out, void* stream) {
  dispatch_dtype(a.dtype(), [&](auto itag) {
    using I = typename decltype(itag)::type;
    dispatch_dtype(out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      if constexpr (IsFloating<I>::value == IsFloating<O>::value && !std::is_same_v<I, fp8e4m3> && !std::is_same_v<I, uint8_t> &&
                    !std::is_same_v<O, fp8e4m3> && !std::is_same_v<O, uint8_t>) {
        using Acc = std::conditional_t<IsFloating<I>::value, float, int64_t>;
        Reducer<Acc> r{kind};
        if (inner == 1 && outer <= INT_MAX) {
          reduce_rows<I, O, Acc><<<unsigned(outer), kThreads, 0, cudaStream_t(stream)>>>(r, a.data<I>(), n, out.data<O>());
        } else {
          reduce_columns<I, O, Acc>
              <<<grid_for(outer * inner), kThreads, 0, cudaStream_t(stream)>>>(r, a.data<I>(), outer, n, inner, out.data<O>());
        }
      }
    });
  });
  cuda::check_launch(kind == ReduceOp::Sum ? "sum" : "max");
}

}  // namespace moe::ops
