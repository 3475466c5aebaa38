// The CPU kernels of the norm family (layer_norm, add_layer_norm, rms_norm),
// one set per instruction set: portable scalar loops (layer_norm.cpp) and
// at::vec kernels compiled for AVX2 and AVX-512 (layer_norm_vec.h, built by
// layer_norm_avx2.cpp and layer_norm_avx512.cpp). layer_norm.cpp checks,
// allocates and picks a set for this CPU.
//
// Absent tensors are undefined (residual, weight, bias, s, mean, ...).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace fasttx {

struct NormKernels {
  // Fills y, s (when residual is given), mean (unless rms) and rstd. x and y
  // may be bfloat16/half beside float statistics (see layer_norm_driver.h).
  void (*forward)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& y, const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                  double eps, bool rms);
  // Fills grad_input (and grad_input_low, its copy in a narrower dtype, when
  // defined), and grad_weight / grad_bias (when defined) through the opmath
  // partial rows weight_partial / bias_partial, (parts, N).
  void (*backward)(const at::Tensor& grad_y, const at::Tensor& grad_s, const at::Tensor& s, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_input,
                   const at::Tensor& grad_input_low, const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& weight_partial,
                   const at::Tensor& bias_partial, bool rms);
};

namespace portable { extern const NormKernels norm; }
namespace avx2 { extern const NormKernels norm; }
namespace avx512 { extern const NormKernels norm; }

}  // namespace fasttx
