// GraphHandle: a CUDA graph for JS (lib/graph.ts). `new GraphHandle(stream)` begins capturing the
// stream; JS runs the work with that stream current, then calls endCapture() (or abortCapture()
// when the work threw). See core/graph.h for the capture mode and the memory pool.
#include <napi.h>

#include <memory>

#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "addon/stream_binding.h"
#include "addon/tensor_binding.h"
#include "core/graph.h"

#ifndef MOE_EP_WITH_CUDA
#define MOE_EP_WITH_CUDA 0
#endif

namespace moe::addon {

namespace {

class GraphHandle : public Napi::ObjectWrap<GraphHandle> {
 public:
  static void init(Napi::Env env, Napi::Object exports) {
    Napi::Function cls =
        DefineClass(env, "GraphHandle",
                    {InstanceMethod<&GraphHandle::end_capture>("endCapture"), InstanceMethod<&GraphHandle::abort_capture>("abortCapture"),
                     InstanceMethod<&GraphHandle::replay>("replay"), InstanceMethod<&GraphHandle::retain>("retain"),
                     InstanceMethod<&GraphHandle::pool_bytes>("poolBytes"), InstanceMethod<&GraphHandle::node_count>("nodeCount"),
                     InstanceMethod<&GraphHandle::replays>("replays"), InstanceMethod<&GraphHandle::dispose>("dispose")});
    constructor() = Napi::Persistent(cls);
    env.AddCleanupHook([] { constructor().Reset(); });
    exports.Set("GraphHandle", cls);
  }

  static Napi::FunctionReference& constructor() {
    static auto* ref = new Napi::FunctionReference();
    return *ref;
  }

  // (stream): begins capturing `stream`.
  explicit GraphHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GraphHandle>(info) {
    guarded(info.Env(), [&] {
      const char* op = "CudaGraph.capture";
      MOE_ARG_CHECK(info.Length() > 0 && info[0].IsObject() && info[0].As<Napi::Object>().InstanceOf(StreamHandle::constructor().Value()),
                    op, "'stream' must be a Stream");
      StreamHandle* s = StreamHandle::Unwrap(info[0].As<Napi::Object>());
      if (s->disposed()) throw_error(ErrorKind::Disposed, op, "'stream' was disposed and cannot be used");
      if (MOE_EP_WITH_CUDA && !s->device().is_cuda()) {
        throw_error(ErrorKind::Unavailable, op,
                    cat("CUDA graphs need a CUDA stream; 'stream' is on ", s->device().str(),
                        " (ops on the CPU run at once: there is nothing to capture)"));
      }
      graph_ = std::make_unique<CudaGraph>(s->device(), s->raw());
      return 0;
    });
  }

  void Finalize(Napi::Env) override { graph_.reset(); }

 private:
  CudaGraph& live(const char* op) {
    if (!graph_) throw_error(ErrorKind::Disposed, op, "the graph was disposed");
    return *graph_;
  }

  Napi::Value end_capture(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value {
      live("CudaGraph.capture").end_capture();
      return info.Env().Undefined();
    });
  }
  // → what broke the capture ("" when nothing did).
  Napi::Value abort_capture(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value { return Napi::String::New(info.Env(), live("CudaGraph.capture").abort_capture()); });
  }
  // replay(stream | null): null is the graph's device's current stream.
  Napi::Value replay(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value {
      const char* op = "CudaGraph.replay";
      CudaGraph& g = live(op);
      void* s = arg_stream_on(info, 0, op, g.device(), "the graph");
      g.replay(s);
      return info.Env().Undefined();
    });
  }
  Napi::Value retain(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value {
      const char* op = "CudaGraph.retain";
      CudaGraph& g = live(op);
      Tensor t = arg_tensor(info, 0, op, "tensor");
      g.retain(t.storage());
      return info.Env().Undefined();
    });
  }
  Napi::Value pool_bytes(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value { return Napi::Number::New(info.Env(), double(graph_ ? graph_->pool_bytes() : 0)); });
  }
  Napi::Value node_count(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(graph_ ? graph_->node_count() : 0));
  }
  Napi::Value replays(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(graph_ ? graph_->replays() : 0)); }
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), [&]() -> Napi::Value {
      std::unique_ptr<CudaGraph> g = std::move(graph_);
      if (g) g->destroy();
      return info.Env().Undefined();
    });
  }

  std::unique_ptr<CudaGraph> graph_;
};

void init_graph(Napi::Env env, Napi::Object exports) { GraphHandle::init(env, exports); }

}  // namespace

MOE_REGISTER_BINDING(init_graph);

}  // namespace moe::addon
