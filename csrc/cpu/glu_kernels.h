// The vectorized glu kernels, compiled once per ISA (glu_avx2.cpp,
// glu_avx512.cpp from glu_vec.h) and chosen at run time by glu.cpp and
// glu_ffn.cpp. Inputs arrive checked and outputs allocated.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/activation.h"

namespace fasttx {

struct GluKernels {
  // y = act(gate) * up, all contiguous with gate's numel and dtype.
  void (*forward)(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& y, Activation activation);
  // grad_gate = grad * up * act'(gate) and grad_up = grad * act(gate), from one read of grad, gate and
  // up; also prod = act(gate) * up when prod is defined (glu_ffn's backward needs it for grad_w_down).
  // grad_gate may be grad itself: each element is read before it is written.
  void (*backward)(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& grad_gate,
                   const at::Tensor& grad_up, const at::Tensor& prod, Activation activation);
};

namespace avx2 { extern const GluKernels glu; }
namespace avx512 { extern const GluKernels glu; }

// The kernels for this CPU, or null where there are none (glu.cpp).
const GluKernels* glu_vector_kernels();

}  // namespace fasttx
