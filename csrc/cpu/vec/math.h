// The Math policy of common/gelu.h and common/activation.h for at::vec
// registers, for kernels inside a cpu/vec/isa_begin.h region.
#pragma once

#ifdef FASTTX_ISA
#include <type_traits>

namespace fasttx {
namespace FASTTX_ISA {

// Sleef's tanh costs as much as 3.5 exps. For float, (1 - e) / (1 + e) with
// e = exp(-2|u|) is within 1e-7 absolute, all that GELU's 1 + tanh(u) needs.
template <typename A>
struct VecMath {
  using V = at::vec::Vectorized<A>;
  static V erf(V x) { return x.erf(); }
  static V exp(V x) { return x.exp(); }
  static V tanh(V u) {
    if constexpr (!std::is_same_v<A, float>) return u.tanh();
    const V e = (V(-2.0f) * u.abs()).exp();
    return ((V(1.0f) - e) / (V(1.0f) + e)) | (u & V(-0.0f));  // sign of u
  }
  // at::vec::maximum propagates NaN, as torch.relu does.
  static V relu(V x) { return at::vec::maximum(x, V(A(0))); }
  // A comparison gives all-ones lanes where it holds; & keeps 1.0 there.
  static V relu_grad(V x) { return (x > V(A(0))) & V(A(1)); }
};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
