#include <cstring>

#include "ops/fill/fill.h"

namespace moe::ops {

void fill_pattern_cpu(void* out, int64_t numel, int64_t elem_size, uint64_t pattern) {
  auto* p = static_cast<unsigned char*>(out);
  for (int64_t i = 0; i < numel; ++i) std::memcpy(p + i * elem_size, &pattern, size_t(elem_size));
}

}  // namespace moe::ops
