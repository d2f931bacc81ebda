// TensorHandle: the JS object that owns one moe::Tensor (a reference to its storage). dispose()
// drops the reference at once; the GC finalizer is only the backstop.
#pragma once
#include <napi.h>

#include "core/tensor.h"

namespace moe::addon {

class TensorHandle : public Napi::ObjectWrap<TensorHandle> {
 public:
  static void init(Napi::Env env, Napi::Object exports);
  static Napi::FunctionReference& constructor();
  static Napi::Object wrap(Napi::Env env, Tensor tensor);

  explicit TensorHandle(const Napi::CallbackInfo& info);
  void Finalize(Napi::Env env) override;
  const Tensor& tensor() const { return tensor_; }

 private:
  Napi::Value describe(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);
  Napi::Value is_disposed(const Napi::CallbackInfo& info);
  Napi::Value view(const Napi::CallbackInfo& info);
  Napi::Value narrow(const Napi::CallbackInfo& info);
  Napi::Value transpose(const Napi::CallbackInfo& info);
  Napi::Value to_buffer(const Napi::CallbackInfo& info);
  Napi::Value shares_storage(const Napi::CallbackInfo& info);
  Napi::Value record_stream(const Napi::CallbackInfo& info);
  void release(Napi::Env env);
  const Tensor& live(const char* op) const;

  Tensor tensor_;
  int64_t external_bytes_ = 0;  // reported to V8 so the GC feels the native memory this handle owns
};

}  // namespace moe::addon
