// Where a tensor lives: the host ("cpu") or one CUDA device ("cuda:N").
#pragma once
#include <string>
#include "core/error.h"

namespace moe {

enum class DeviceType : int32_t { CPU = 0, CUDA = 1 };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  bool operator==(const Device& o) const { return type == o.type && (is_cpu() || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return is_cpu() ? "cpu" : cat("cuda:", index); }
};

inline Device cpu_device() { return Device{DeviceType::CPU, 0}; }
inline Device cuda_device(int index) { return Device{DeviceType::CUDA, index}; }

}  // namespace moe
