// MOE_HD marks functions shared by the CPU reference and the CUDA kernels, so both sides run the
// same conversion and RNG code and their results can be compared bit for bit where that holds.
#pragma once
#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif
