// The FFN activations (gelu_ffn): GELU (erf), GELU (tanh) and ReLU, forward
// and derivative, shared by the CPU and CUDA kernels. The GELU formulas are
// gelu.h's; this only adds ReLU and the code the Python layer passes.
#pragma once

#include "common/gelu.h"

#include <cstdint>

namespace fasttx {

// The `activation` integer of gelu_ffn_{fwd,bwd}_{cpu,cuda}; fasttx/ops/gelu_ffn.py mirrors it.
enum class Activation : int64_t { kGelu = 0, kGeluTanh = 1, kRelu = 2 };

namespace activation {

// Math is gelu.h's policy (erf, exp, tanh) plus relu(z) and relu_backward(g, z), so
// that T may be a scalar or a SIMD vector.
template <typename Math, typename T>
FASTTX_HOST_DEVICE T forward(T z, Activation act) {
  switch (act) {
    case Activation::kGeluTanh: return gelu::tanh_forward<Math>(z);
    case Activation::kRelu: return Math::relu(z);
    default: return gelu::erf_forward<Math>(z);
  }
}

// g * d act / dz. ReLU's is torch's threshold_backward, where(z > 0, g, 0): 0 at z = 0, and a NaN or inf
// g stops at a unit that is off, where g * 0 would be NaN.
template <typename Math, typename T>
FASTTX_HOST_DEVICE T backward(T g, T z, Activation act) {
  switch (act) {
    case Activation::kGeluTanh: return g * gelu::tanh_grad<Math>(z);
    case Activation::kRelu: return Math::relu_backward(g, z);
    default: return g * gelu::erf_grad<Math>(z);
  }
}

}  // namespace activation
}  // namespace fasttx
