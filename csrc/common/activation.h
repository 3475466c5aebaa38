// The FFN activations (gelu_ffn, glu, glu_ffn): GELU (erf), GELU (tanh), ReLU
// and SiLU, forward and derivative, shared by the CPU and CUDA kernels. The
// GELU formulas are gelu.h's; this only adds ReLU, SiLU and the code the
// Python layer passes.
#pragma once

#include "common/gelu.h"

#include <cstdint>

namespace fasttx {

// The `activation` integer of gelu_ffn_{fwd,bwd}_{cpu,cuda} and glu*_{cpu,cuda}; fasttx/ops/gelu_ffn.py
// and fasttx/ops/glu.py mirror it (gelu_ffn takes 0-2, the gated ops 0, 1 and 3).
enum class Activation : int64_t { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

namespace silu {

// silu(z) = z sigmoid(z) = z / (1 + exp(-z)); exp(-z) = inf for z << 0 gives 0 (as torch).
template <typename Math, typename T>
FASTTX_HOST_DEVICE T sigmoid(T z) {
  return T(1.0f) / (T(1.0f) + Math::exp(T(-1.0f) * z));
}

template <typename Math, typename T>
FASTTX_HOST_DEVICE T forward(T z) {
  return z * sigmoid<Math>(z);
}

// d silu / dz = s (1 + z (1 - s)), s = sigmoid(z): torch's silu_backward.
template <typename Math, typename T>
FASTTX_HOST_DEVICE T grad(T z) {
  const T s = sigmoid<Math>(z);
  return s * (T(1.0f) + z * (T(1.0f) - s));
}

}  // namespace silu

namespace activation {

// Math is gelu.h's policy (erf, exp, tanh) plus relu(z) and relu_backward(g, z), so
// that T may be a scalar or a SIMD vector.
template <typename Math, typename T>
FASTTX_HOST_DEVICE T forward(T z, Activation act) {
  switch (act) {
    case Activation::kGeluTanh: return gelu::tanh_forward<Math>(z);
    case Activation::kRelu: return Math::relu(z);
    case Activation::kSilu: return silu::forward<Math>(z);
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
    case Activation::kSilu: return g * silu::grad<Math>(z);
    default: return g * gelu::erf_grad<Math>(z);
  }
}

// act(z) and act'(z) together, for the gated ops' backward (which needs both): GELU
// (erf) shares its Phi between them where the Math policy allows. Not for ReLU.
template <typename Math, typename T>
FASTTX_HOST_DEVICE void forward_and_grad(T z, Activation act, T& y, T& dy) {
  switch (act) {
    case Activation::kSilu: {
      const T s = silu::sigmoid<Math>(z);
      y = z * s;
      dy = s * (T(1.0f) + z * (T(1.0f) - s));
      return;
    }
    case Activation::kGeluTanh:
      y = gelu::tanh_forward<Math>(z);
      dy = gelu::tanh_grad<Math>(z);
      return;
    default:
      y = gelu::erf_forward<Math>(z);
      dy = gelu::erf_grad<Math>(z);
      return;
  }
}

}  // namespace activation
}  // namespace fasttx
