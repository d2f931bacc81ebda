#include "core/tensor.h"

#include "core/cuda_runtime.h"

namespace moe {

Storage::Storage(const Device& device, int64_t bytes, void* stream, const std::string& op)
    : device_(device), bytes_(bytes), data_(allocate(device, bytes, stream, op)) {}

Storage::~Storage() { deallocate(device_, data_); }

Shape contiguous_strides(const Shape& shape) {
  Shape s(shape.size());
  int64_t acc = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    s[i] = acc;
    acc *= std::max<int64_t>(shape[i], 1);
  }
  return s;
}

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

void check_shape(const Shape& shape, DType dtype, const std::string& op, const char* arg) {
  MOE_ARG_CHECK(shape.size() <= size_t(kMaxDims), op, "'", arg, "' has ", shape.size(), " dimensions; at most ", kMaxDims,
                " are supported");
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    MOE_ARG_CHECK(shape[i] >= 0, op, "'", arg, "' ", shape_str(shape), " has a negative size in dimension ", i);
    MOE_ARG_CHECK(shape[i] <= kMaxAllocationBytes, op, "'", arg, "' ", shape_str(shape), " has an absurd size in dimension ", i);
    if (shape[i] != 0 && n > kMaxAllocationBytes / shape[i]) {
      throw_error(ErrorKind::InvalidArgument, op, cat("'", arg, "' ", shape_str(shape), " has too many elements"));
    }
    n *= shape[i];
  }
  MOE_ARG_CHECK(n <= kMaxAllocationBytes / dtype_size(dtype), op, "'", arg, "' ", shape_str(shape), " of ", dtype_name(dtype),
                " needs more than the 64 TiB limit");
}

int normalize_dim(int dim, int rank, const std::string& op, const char* arg) {
  MOE_ARG_CHECK(dim >= -rank && dim < rank, op, "'", arg, "' = ", dim, " is out of range for a tensor of rank ", rank);
  return dim < 0 ? dim + rank : dim;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, const Device& device, const std::string& op) {
  check_shape(shape, dtype, op, "shape");
  int64_t n = 1;
  for (auto d : shape) n *= d;
  void* stream = device.is_cuda() ? cuda::current_stream(device.index) : nullptr;
  Tensor t;
  t.storage_ = std::make_shared<Storage>(device, n * dtype_size(dtype), stream, op);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (size_t i = shape_.size(); i-- > 0;) {
    if (shape_[i] == 1) continue;
    if (shape_[i] == 0) return true;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

Tensor Tensor::view(const Shape& shape, const std::string& op) const {
  MOE_ARG_CHECK(is_contiguous(), op, "cannot view a non-contiguous tensor ", describe(), " with a new shape; call contiguous() first");
  Shape out = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] == -1) {
      MOE_ARG_CHECK(infer < 0, op, "'shape' ", shape_str(shape), " has more than one -1");
      infer = int(i);
    } else {
      MOE_ARG_CHECK(out[i] >= 0, op, "'shape' ", shape_str(shape), " has a negative size");
      known *= out[i];
    }
  }
  if (infer >= 0) {
    MOE_ARG_CHECK(known != 0 && numel() % known == 0, op, "'shape' ", shape_str(shape), " does not fit ", numel(), " elements");
    out[size_t(infer)] = numel() / known;
    known *= out[size_t(infer)];
  }
  check_shape(out, dtype_, op, "shape");
  MOE_ARG_CHECK(known == numel(), op, "'shape' ", shape_str(shape), " has ", known, " elements but the tensor ", describe(), " has ",
                numel());
  Tensor t = *this;
  t.shape_ = out;
  t.strides_ = contiguous_strides(out);
  return t;
}

Tensor Tensor::narrow(int dim, int64_t start, int64_t length, const std::string& op) const {
  int d = normalize_dim(dim, this->dim(), op, "dim");
  MOE_ARG_CHECK(start >= 0 && length >= 0 && start + length <= shape_[size_t(d)], op, "'start' ", start, " and 'length' ", length,
                " do not fit dimension ", d, " of size ", shape_[size_t(d)]);
  Tensor t = *this;
  t.shape_[size_t(d)] = length;
  if (length > 0) t.offset_ += start * strides_[size_t(d)];
  return t;
}

Tensor Tensor::transpose(int d0, int d1, const std::string& op) const {
  int a = normalize_dim(d0, dim(), op, "dim0"), b = normalize_dim(d1, dim(), op, "dim1");
  Tensor t = *this;
  std::swap(t.shape_[size_t(a)], t.shape_[size_t(b)]);
  std::swap(t.strides_[size_t(a)], t.strides_[size_t(b)]);
  return t;
}

std::string Tensor::describe() const {
  if (!defined()) return "<undefined>";
  return cat(dtype_name(dtype_), shape_str(shape_), " ", device().str(), is_contiguous() ? "" : " strided");
}

}  // namespace moe
