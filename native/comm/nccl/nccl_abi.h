// The part of NCCL's C ABI that moe-ep calls, declared here so the addon builds without NCCL and
// opens libnccl.so.2 at run time. Values and layouts are NCCL's (stable since 2.x); where a real
// nccl.h is present at build time, nccl_abi_check.cc static_asserts that they match it.
#pragma once
#include <cstddef>

// Opaque handles, declared at global scope as nccl.h and cuda_runtime.h declare them.
struct ncclComm;
struct CUstream_st;

namespace moe::nccl {

using Comm = ::ncclComm*;
struct UniqueId {
  char internal[128];
};

enum Result : int {
  Success = 0,
  UnhandledCudaError = 1,
  SystemError = 2,
  InternalError = 3,
  InvalidArgument = 4,
  InvalidUsage = 5,
  RemoteError = 6,
  InProgress = 7,
};

enum DataType : int {
  Int8 = 0,
  Uint8 = 1,
  Int32 = 2,
  Uint32 = 3,
  Int64 = 4,
  Uint64 = 5,
  Float16 = 6,
  Float32 = 7,
  Float64 = 8,
  Bfloat16 = 9,
  Float8e4m3 = 10,
  Float8e5m2 = 11,
};

enum RedOp : int { Sum = 0, Prod = 1, Max = 2, Min = 3, Avg = 4 };

// Function types, exactly as nccl.h declares them (cudaStream_t is a pointer to an opaque struct).
using CudaStream = ::CUstream_st*;
using GetVersionFn = Result (*)(int* version);
using GetUniqueIdFn = Result (*)(UniqueId* id);
using CommInitRankFn = Result (*)(Comm* comm, int nranks, UniqueId id, int rank);
using CommDestroyFn = Result (*)(Comm comm);
using CommAbortFn = Result (*)(Comm comm);
using CommGetAsyncErrorFn = Result (*)(Comm comm, Result* async_error);
using GetErrorStringFn = const char* (*)(Result result);
using GetLastErrorFn = const char* (*)(Comm comm);
using AllReduceFn = Result (*)(const void* send, void* recv, size_t count, DataType type, RedOp op, Comm comm, CudaStream stream);
using BroadcastFn = Result (*)(const void* send, void* recv, size_t count, DataType type, int root, Comm comm, CudaStream stream);
using AllGatherFn = Result (*)(const void* send, void* recv, size_t count, DataType type, Comm comm, CudaStream stream);
using SendFn = Result (*)(const void* send, size_t count, DataType type, int peer, Comm comm, CudaStream stream);
using RecvFn = Result (*)(void* recv, size_t count, DataType type, int peer, Comm comm, CudaStream stream);
using GroupStartFn = Result (*)();
using GroupEndFn = Result (*)();
// ncclCommSplit (NCCL 2.18+); the config pointer is ncclConfig_t*, passed as nullptr here.
using CommSplitFn = Result (*)(Comm comm, int color, int key, Comm* newcomm, void* config);

// The loaded library: every pointer is set when loaded() is true.
struct Api {
  GetVersionFn getVersion = nullptr;
  GetUniqueIdFn getUniqueId = nullptr;
  CommInitRankFn commInitRank = nullptr;
  CommDestroyFn commDestroy = nullptr;
  CommAbortFn commAbort = nullptr;
  CommGetAsyncErrorFn commGetAsyncError = nullptr;
  GetErrorStringFn getErrorString = nullptr;
  GetLastErrorFn getLastError = nullptr;
  AllReduceFn allReduce = nullptr;
  BroadcastFn broadcast = nullptr;
  AllGatherFn allGather = nullptr;
  SendFn send = nullptr;
  RecvFn recv = nullptr;
  GroupStartFn groupStart = nullptr;
  GroupEndFn groupEnd = nullptr;
  CommSplitFn commSplit = nullptr;  // optional: null with NCCL older than 2.18 (split then throws)
};

}  // namespace moe::nccl
