// Element types a tensor can hold, their names (shared with TypeScript) and a type dispatcher.
#pragma once
#include <cstdint>
#include <string>
#include "core/numeric.h"

namespace moe {

enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2, i32 = 3, i64 = 4, u8 = 5, fp8e4m3 = 6 };
constexpr int kNumDTypes = 7;

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::fp8e4m3: return "fp8e4m3";
  }
  return "?";
}

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32:
    case DType::i32: return 4;
    case DType::bf16:
    case DType::f16: return 2;
    case DType::i64: return 8;
    case DType::u8:
    case DType::fp8e4m3: return 1;
  }
  return 0;
}

inline bool dtype_is_floating(DType t) { return t == DType::f32 || t == DType::bf16 || t == DType::f16 || t == DType::fp8e4m3; }

template <DType D> struct StorageOf;
template <> struct StorageOf<DType::f32> { using type = float; };
template <> struct StorageOf<DType::bf16> { using type = bf16; };
template <> struct StorageOf<DType::f16> { using type = f16; };
template <> struct StorageOf<DType::i32> { using type = int32_t; };
template <> struct StorageOf<DType::i64> { using type = int64_t; };
template <> struct StorageOf<DType::u8> { using type = uint8_t; };
template <> struct StorageOf<DType::fp8e4m3> { using type = fp8e4m3; };

template <typename T> struct TypeTag { using type = T; };

// Calls fn(TypeTag<T>{}) with T the storage type of `t`. Ops restrict the set they accept before
// calling this, so every branch must compile for every T the op instantiates.
template <typename Fn> decltype(auto) dispatch_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::f32: return fn(TypeTag<float>{});
    case DType::bf16: return fn(TypeTag<bf16>{});
    case DType::f16: return fn(TypeTag<f16>{});
    case DType::i32: return fn(TypeTag<int32_t>{});
    case DType::i64: return fn(TypeTag<int64_t>{});
    case DType::u8: return fn(TypeTag<uint8_t>{});
    case DType::fp8e4m3: return fn(TypeTag<fp8e4m3>{});
  }
  return fn(TypeTag<float>{});
}

// The three floating types arithmetic ops compute on (fp8 is a storage format only).
template <typename Fn> decltype(auto) dispatch_float(DType t, Fn&& fn) {
  switch (t) {
    case DType::bf16: return fn(TypeTag<bf16>{});
    case DType::f16: return fn(TypeTag<f16>{});
    default: return fn(TypeTag<float>{});
  }
}

}  // namespace moe
