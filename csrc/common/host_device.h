// Marks a function callable from host and device code when compiled by nvcc,
// and a plain inline function in the C++ (CPU) build.
#pragma once

#if defined(__CUDACC__)
#define FASTTX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTTX_HOST_DEVICE inline
#endif
