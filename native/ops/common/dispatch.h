// Device dispatch for ops: the CPU reference always exists; the CUDA kernel only in CUDA builds.
#pragma once
#include "core/cuda_runtime.h"
#include "core/tensor.h"

#if MOE_EP_WITH_CUDA
#define MOE_ON_DEVICE(t, op, cpu_call, cuda_call)          \
  do {                                                     \
    if ((t).device().is_cpu()) {                           \
      cpu_call;                                            \
    } else {                                               \
      ::moe::cuda::require_device((t).device(), op);       \
      ::moe::cuda::DeviceGuard guard_((t).device().index); \
      cuda_call;                                           \
    }                                                      \
  } while (0)
#else
#define MOE_ON_DEVICE(t, op, cpu_call, cuda_call)    \
  do {                                               \
    if ((t).device().is_cpu()) {                     \
      cpu_call;                                      \
    } else {                                         \
      ::moe::cuda::require_device((t).device(), op); \
    }                                                \
  } while (0)
#endif
