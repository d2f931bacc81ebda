// Tensor: a typed, shaped, strided view of a Storage block on one device. Views share storage;
// the storage is freed when the last tensor referring to it is disposed or collected.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/device.h"
#include "core/dtype.h"

namespace moe {

constexpr int kMaxDims = 8;

class Storage {
 public:
  Storage(const Device& device, int64_t bytes, void* stream, const std::string& op);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  int64_t bytes() const { return bytes_; }
  const Device& device() const { return device_; }

 private:
  Device device_;
  int64_t bytes_;
  void* data_;
};

using Shape = std::vector<int64_t>;

class Tensor {
 public:
  Tensor() = default;
  // A new contiguous tensor, uninitialised, allocated on the device's current stream.
  static Tensor empty(const Shape& shape, DType dtype, const Device& device, const std::string& op = "empty");

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  const Device& device() const { return storage_->device(); }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t offset() const { return offset_; }
  int dim() const { return int(shape_.size()); }
  int64_t size(int d) const { return shape_[size_t(d)]; }
  int64_t numel() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype_); }
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  // Pointer to the first element of the view (offset applied).
  void* raw() const { return static_cast<char*>(storage_->data()) + offset_ * dtype_size(dtype_); }
  template <typename T> T* data() const { return static_cast<T*>(raw()); }

  // ---- views (no copy) ----
  Tensor view(const Shape& shape, const std::string& op = "view") const;  // contiguous only; one -1 allowed
  Tensor narrow(int dim, int64_t start, int64_t length, const std::string& op = "narrow") const;
  Tensor transpose(int d0, int d1, const std::string& op = "transpose") const;

  // "bf16[4,8] cuda:0" (plus " strided" when not contiguous), used in every error message.
  std::string describe() const;

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_, strides_;
  int64_t offset_ = 0;  // in elements
  DType dtype_ = DType::f32;
};

Shape contiguous_strides(const Shape& shape);
std::string shape_str(const Shape& shape);
// Validates a shape supplied by a caller: rank, non-negative sizes, element count and bytes in range.
void check_shape(const Shape& shape, DType dtype, const std::string& op, const char* arg);
int normalize_dim(int dim, int rank, const std::string& op, const char* arg);

}  // namespace moe
