// The vectorized elementwise passes of gelu_ffn between its GEMMs, compiled
// once per ISA (gelu_ffn_avx2.cpp, gelu_ffn_avx512.cpp from gelu_ffn_vec.h)
// and chosen at run time by gelu_ffn.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/activation.h"

namespace fasttx {

struct FfnActivationKernels {
  // The forward's pass between its GEMMs: act = activation(preact), (M, H).
  void (*forward)(const at::Tensor& preact, const at::Tensor& act, Activation activation);
  // The backward's pass between its GEMMs: grad_h = grad_a * activation'(preact)
  // in place of grad_a; act = activation(preact), recomputed for grad_w2, when
  // act is defined; and
  // grad_b1 (when defined) = column sums of grad_h through `partial`, an
  // opmath (chunks, H) scratch summed in a fixed order.
  void (*backward)(const at::Tensor& grad_a, const at::Tensor& preact, const at::Tensor& act,
                   const at::Tensor& grad_b1, const at::Tensor& partial, Activation activation);
};

namespace avx2 { extern const FfnActivationKernels gelu_ffn; }
namespace avx512 { extern const FfnActivationKernels gelu_ffn; }

}  // namespace fasttx
