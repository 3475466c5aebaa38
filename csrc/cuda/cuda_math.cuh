// The Math policy of csrc/common/gelu.h and activation.h for CUDA kernels.
#pragma once

namespace fasttx {

// __expf is the SFU exp2 path (a few ulp, plenty for GELU); erff and tanhf are
// the accurate library versions so fp32 results match PyTorch to fp32
// tolerance. That holds because fasttx builds without --use_fast_math, which
// would make tanhf tanh.approx.f32; tests/test_cuda_build.py reads the PTX.
struct CudaMath {
  static __device__ __forceinline__ float erf(float x) { return erff(x); }
  static __device__ __forceinline__ float exp(float x) { return __expf(x); }
  static __device__ __forceinline__ float tanh(float x) { return tanhf(x); }
  static __device__ __forceinline__ double erf(double x) { return ::erf(x); }
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double tanh(double x) { return ::tanh(x); }
  // ScalarMath's: relu(NaN) = NaN, and the gradient selected as torch's threshold_backward.
  template <typename T>
  static __device__ __forceinline__ T relu(T x) { return x > T(0) || x != x ? x : T(0); }
  template <typename T>
  static __device__ __forceinline__ T relu_backward(T g, T x) { return x > T(0) ? g : T(0); }
};

}  // namespace fasttx
