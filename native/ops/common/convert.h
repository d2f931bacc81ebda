// Element conversion between any two storage types: integers to integers directly, everything
// else through float. Shared by the CPU loops and the kernels.
#pragma once
#include <type_traits>
#include "core/numeric.h"

namespace moe::ops {

template <typename Dst, typename Src> MOE_HD Dst convert(Src v) {
  if constexpr (std::is_same_v<Dst, Src>) {
    return v;
  } else if constexpr (!IsFloating<Dst>::value && !IsFloating<Src>::value) {
    return Dst(v);
  } else {
    return from_float<Dst>(to_float(v));
  }
}

}  // namespace moe::ops
