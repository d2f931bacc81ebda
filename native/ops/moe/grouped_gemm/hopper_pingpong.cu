// Host entry of the ping-pong Hopper grouped GEMM (the kernel and its protocol: hopper_pingpong.cuh).
// Compiled for sm_90a alone, beside hopper.cu (CMake).
#include "ops/moe/grouped_gemm/hopper_pingpong.h"

#include <cuda_runtime.h>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/moe/grouped_gemm/hopper.h"
#include "ops/moe/grouped_gemm/hopper_pingpong.cuh"

namespace moe::ops {

bool grouped_gemm_pingpong_fits(const GroupedGemm& g) {
  return g.epilogue == GemmEpilogue::Store && g.out.dtype() == DType::f32 && grouped_gemm_hopper_fits(g);
}

void grouped_gemm_hopper_pingpong(const GroupedGemm& g, const int32_t* tile_start, void* stream) {
  namespace pp = pingpong;
  MOE_INTERNAL_CHECK(grouped_gemm_pingpong_fits(g), "groupedGemm: the ping-pong kernel was chosen for a launch it does not take");
  pp::Problem q{};
  q.mode = g.mode == GemmMode::TN ? pp::Mode::TN : g.mode == GemmMode::NT ? pp::Mode::NT : pp::Mode::NN;
  q.a = g.a.raw();
  q.b = g.b.raw();
  q.offsets = g.offsets.data<int32_t>();
  q.tile_start = tile_start;
  q.out = g.out.data<float>();
  q.M = g.a.size(0);
  q.E = g.offsets.size(0) - 1;
  const bool tn = g.mode == GemmMode::TN;
  q.K = tn ? g.a.size(1) : g.b.size(1);
  q.N = tn ? g.b.size(1) : g.b.size(2);
  q.accumulate = g.accumulate;
  MOE_INTERNAL_CHECK(tn || tile_start != nullptr, "groupedGemm: the ping-pong kernel needs tile_start for NN/NT");
  int dev = 0, sms = 0;
  cuda::check(cudaGetDevice(&dev), "groupedGemm", "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "groupedGemm", "cudaDeviceGetAttribute");
  const char* failed = pp::run(q, sms, cudaStream_t(stream));
  MOE_ARG_CHECK(failed == nullptr, "groupedGemm", "the ping-pong kernel: ", failed ? failed : "");
  cuda::check_launch("groupedGemm");
}

}  // namespace moe::ops
