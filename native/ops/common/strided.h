// Maps a linear (row-major) element index to the storage offset of a strided view. Passed by value
// into kernels; used by the CPU loops too, so both walk views the same way.
#pragma once
#include <cstdint>
#include "core/hostdevice.h"
#include "core/tensor.h"

namespace moe::ops {

struct StridedIndex {
  int rank = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  MOE_HD int64_t offset(int64_t linear) const {
    int64_t off = 0;
    for (int d = rank - 1; d >= 0; --d) {
      int64_t i = linear % sizes[d];
      linear /= sizes[d];
      off += i * strides[d];
    }
    return off;
  }
};

inline StridedIndex strided_index(const Tensor& t) {
  StridedIndex s;
  s.rank = t.dim();
  for (int d = 0; d < s.rank; ++d) {
    s.sizes[d] = t.shape()[size_t(d)];
    s.strides[d] = t.strides()[size_t(d)];
  }
  return s;
}

}  // namespace moe::ops
