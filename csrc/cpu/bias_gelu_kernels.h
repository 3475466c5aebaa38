// The vectorized bias_gelu kernels, compiled once per ISA
// (bias_gelu_avx2.cpp, bias_gelu_avx512.cpp from bias_gelu_vec.h) and chosen
// at run time by bias_gelu.cpp. Inputs arrive checked and outputs allocated.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/gelu.h"

namespace fasttx {

struct BiasGeluKernels {
  // y = gelu(x + bias); x, y (M, N), bias (N,), all contiguous, one dtype.
  void (*forward)(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& y, GeluApprox approx);
  // grad_x, and grad_bias through `partial`, an opmath (chunks, N) scratch.
  void (*backward)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& grad_x,
                   const at::Tensor& grad_bias, const at::Tensor& partial, GeluApprox approx);
};

namespace avx2 { extern const BiasGeluKernels bias_gelu; }
namespace avx512 { extern const BiasGeluKernels bias_gelu; }

}  // namespace fasttx
