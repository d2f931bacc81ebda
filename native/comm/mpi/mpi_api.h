// The C boundary between the addon and its MPI backend library (moe_ep_mpi.so, linked against
// libmpi and opened with dlopen on first use, so the addon itself never needs libmpi). Plain C
// types only: no C++ exceptions or classes cross it. Buffers are host memory; counts are bytes
// (all_reduce: elements). Every call returns MOE_MPI_OK or an error code with a message.
#pragma once
#include <stdint.h>

extern "C" {

#define MOE_MPI_ABI_VERSION 2

enum {
  MOE_MPI_OK = 0,
  MOE_MPI_INVALID = 1,  // a mismatched or malformed call (InvalidArgument)
  MOE_MPI_TIMEOUT = 2,  // the timeout passed (Timeout)
  MOE_MPI_FAILED = 3,   // MPI reported an error (Internal)
  MOE_MPI_UNAVAILABLE = 4,
};

// Element types for all_reduce (the addon stages bf16/f16 through f32): moe::DType codes.
enum { MOE_MPI_F32 = 0, MOE_MPI_I32 = 3, MOE_MPI_I64 = 4, MOE_MPI_U8 = 5 };

typedef struct moe_mpi_comm moe_mpi_comm;
typedef struct {
  int code;
  char message[4096];
} moe_mpi_error;

typedef struct {
  int abi_version;
  // Initialises MPI (MPI_Init_thread) unless the application already did; idempotent.
  int (*init)(moe_mpi_error* err);
  const char* (*library_version)(void);
  // A duplicate of MPI_COMM_WORLD (MPI_Comm_idup, so it honours the timeout too).
  moe_mpi_comm* (*world)(int64_t timeout_ms, moe_mpi_error* err);
  int (*rank)(const moe_mpi_comm* c);
  int (*size)(const moe_mpi_comm* c);
  int (*all_reduce)(moe_mpi_comm* c, void* buf, int64_t count, int dtype, int op, int64_t timeout_ms, const char* opname,
                    moe_mpi_error* err);
  int (*all_gather)(moe_mpi_comm* c, const void* in, void* out, int64_t bytes, int64_t timeout_ms, const char* opname, moe_mpi_error* err);
  int (*broadcast)(moe_mpi_comm* c, void* buf, int64_t bytes, int root, int64_t timeout_ms, const char* opname, moe_mpi_error* err);
  // Point-to-point exchange behind the addon's call agreement, all_to_all and all_to_all_v: to every
  // peer p, send_bytes[p] bytes from send (peers in order); from every p, recv_bytes[p] bytes into
  // recv, with message tag `tag`. The sizes were agreed first (the addon's agree()); a peer that
  // sends another size anyway is an error (MPI truncates, never overruns), and a timeout names
  // the peers not heard from.
  int (*exchange)(moe_mpi_comm* c, int tag, const void* send, const int64_t* send_bytes, void* recv, const int64_t* recv_bytes,
                  int64_t timeout_ms, const char* opname, moe_mpi_error* err);
  // MPI_Comm_split, which blocks: call it only once every rank has arrived (the addon agrees first).
  moe_mpi_comm* (*split)(moe_mpi_comm* c, int color, int key, moe_mpi_error* err);
  // The communicator is given up (a local abort): like a timeout, it is never freed, and
  // MPI_Finalize at exit gets a deadline.
  void (*abandon)(moe_mpi_comm* c);
  void (*free)(moe_mpi_comm* c);
} moe_mpi_api;

typedef const moe_mpi_api* (*moe_ep_mpi_api_fn)(void);
__attribute__((visibility("default"))) const moe_mpi_api* moe_ep_mpi_api(void);
}
