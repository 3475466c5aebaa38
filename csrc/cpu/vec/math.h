// The Math policy of common/gelu.h and common/activation.h for at::vec
// registers, for kernels inside a cpu/vec/isa_begin.h region.
#pragma once

#ifdef FASTTX_ISA
#include <type_traits>

#include "common/gelu.h"

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
  // Phi(x) and phi(x) for erf_grad, float only (see gelu.h's HasNormalCdfPdf).
  // erf(a), a = |x|/sqrt 2, by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
  // the formula of at::vec's own float erf: 1 - t p(t) exp(-a^2) with
  // t = 1/(1 + 0.3275911 a). Its exp(-a^2) is phi's exp(-x^2/2), so one exp
  // serves both, where erf() then exp() would cost two. The tail q = t p(t)
  // exp(-a^2) / 2 gives Phi(-|x|) directly, without 1 + erf's cancellation.
  template <typename B = A, std::enable_if_t<std::is_same_v<B, float>, int> = 0>
  static void normal_cdf_pdf(V x, V& cdf, V& pdf) {
    const V a = (x * V(float(gelu::kInvSqrt2))).abs();
    const V t = V(1.0f) / at::vec::fmadd(V(0.3275911f), a, V(1.0f));
    V p = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    p = at::vec::fmadd(p, t, V(1.421413741f));
    p = at::vec::fmadd(p, t, V(-0.284496736f));
    p = at::vec::fmadd(p, t, V(0.254829592f));
    const V e = (V(-0.5f) * x * x).exp();
    const V q = V(0.5f) * (p * t) * e;                                // Phi(-|x|)
    cdf = V::blendv(q, V(1.0f) - q, x > V(0.0f));
    pdf = e * V(float(gelu::kInvSqrt2Pi));
  }
  // at::vec::maximum propagates NaN, as torch.relu does.
  static V relu(V x) { return at::vec::maximum(x, V(A(0))); }
  // A comparison gives all-ones lanes where it holds; & keeps 1.0 there.
  static V relu_grad(V x) { return (x > V(A(0))) & V(A(1)); }
};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
