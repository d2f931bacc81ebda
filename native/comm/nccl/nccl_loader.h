// Finds and opens libnccl.so.2 once per process. Search order:
//   1. MOE_EP_NCCL_LIBRARY (a file path), if set: nothing else is tried;
//   2. the system library path (dlopen("libnccl.so.2"): LD_LIBRARY_PATH, the ld cache);
//   3. pip wheels (nvidia-nccl-cu12/cu13: site-packages/nvidia/nccl/lib) under VIRTUAL_ENV,
//      CONDA_PREFIX, ~/.local and the system Pythons; 4. conda ($CONDA_PREFIX/lib, /opt/conda/lib).
#pragma once
#include <string>
#include <vector>

#include "comm/nccl/nccl_abi.h"

namespace moe::nccl {

struct LoadAttempt {
  std::string path;
  std::string error;  // empty for the one that loaded
};

struct LoadStatus {
  bool loaded = false;
  std::string path;  // the file that was opened
  int version = 0;   // e.g. 22803 for 2.28.3
  std::vector<LoadAttempt> attempts;
  std::string summary;  // why not, when not loaded
};

const LoadStatus& load_status();  // tries to load on first call
// The API, or an Unavailable error naming where it looked.
const Api& api(const char* op);

}  // namespace moe::nccl
