// The Math policy of common/gelu.h and common/activation.h for at::vec
// registers, for kernels inside a cpu/vec/isa_begin.h region.
#pragma once

#ifdef FASTTX_ISA
#include <limits>
#include <type_traits>

#include "common/gelu.h"

namespace fasttx {
namespace FASTTX_ISA {

// exp and 1/d for float lanes, inline. The GELU kernels are compute-bound on
// a CPU (as many ns per element in L1 as from DRAM), and most of that time
// was Sleef's exp, an out-of-line call, and the divider.
//
// exp: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2/2 (Cody-Waite,
// ln2 in two parts, so r is exact), e^r by its Taylor series to r^7 (the
// remainder is < 6e-9 relative), then times 2^n. Within 2 ulp of the true
// value; overflows to inf past 88.72, and gives 0 below -87.3 (AVX2) or
// flushes through the denormals (AVX-512), where GELU's terms are 0 anyway.
// NaN stays NaN: min/max return their second operand, x, when it is NaN.
inline at::vec::Vectorized<float> exp_float(at::vec::Vectorized<float> v) {
  using V = at::vec::Vectorized<float>;
#if defined(FASTTX_ISA_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), __m512(v)));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), _mm256_min_ps(_mm256_set1_ps(88.37626f), __m256(v)));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  V r = at::vec::fnmadd(V(n), V(0.693359375f), V(x));  // exact: ln2_hi has 9 bits, |n| <= 150
  r = at::vec::fnmadd(V(n), V(-2.12194440e-4f), r);
  V p = at::vec::fmadd(V(1.0f / 5040), r, V(1.0f / 720));
  p = at::vec::fmadd(p, r, V(1.0f / 120));
  p = at::vec::fmadd(p, r, V(1.0f / 24));
  p = at::vec::fmadd(p, r, V(1.0f / 6));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.0f));
  p = at::vec::fmadd(p, r, V(1.0f));
#if defined(FASTTX_ISA_AVX512)
  return V(_mm512_scalef_ps(__m512(p), n));  // p * 2^n, inf and 0 past the range
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  V y = p * V(_mm256_castsi256_ps(bits));
  y = V::blendv(y, V(std::numeric_limits<float>::infinity()), v > V(88.7228394f));
  return V::blendv(y, V(0.0f), v < V(-87.33654f));
#endif
}

// 1/d. AVX-512: the 14-bit reciprocal and one Newton step, r (2 - d r), within
// an ulp (and exact at powers of 2), where a division occupies the divider for
// many cycles. AVX2's reciprocal has only 12 bits: one step leaves 1/1 at
// 1 - 6e-8, which tanh's 1 - t^2 would turn into a nonzero gradient far in
// the tail, so AVX2 divides.
inline at::vec::Vectorized<float> reciprocal_float(at::vec::Vectorized<float> d) {
  using V = at::vec::Vectorized<float>;
#if defined(FASTTX_ISA_AVX512)
  const V r(_mm512_rcp14_ps(__m512(d)));
  return r * at::vec::fnmadd(d, r, V(2.0f));
#else
  return V(1.0f) / d;
#endif
}

// Sleef's tanh costs as much as 3.5 exps. For float, (1 - e) / (1 + e) with
// e = exp(-2|u|) is within 1e-7 absolute, all that GELU's 1 + tanh(u) needs.
template <typename A>
struct VecMath {
  using V = at::vec::Vectorized<A>;
  static V erf(V x) { return x.erf(); }
  static V exp(V x) {
    if constexpr (std::is_same_v<A, float>) return exp_float(x);
    else return x.exp();
  }
  static V tanh(V u) {
    if constexpr (!std::is_same_v<A, float>) {
      return u.tanh();
    } else {
      const V e = exp_float(V(-2.0f) * u.abs());
      return ((V(1.0f) - e) * reciprocal_float(V(1.0f) + e)) | (u & V(-0.0f));  // sign of u
    }
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
    const V t = reciprocal_float(at::vec::fmadd(V(0.3275911f), a, V(1.0f)));
    V p = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
    p = at::vec::fmadd(p, t, V(1.421413741f));
    p = at::vec::fmadd(p, t, V(-0.284496736f));
    p = at::vec::fmadd(p, t, V(0.254829592f));
    const V e = exp_float(V(-0.5f) * x * x);
    const V q = V(0.5f) * (p * t) * e;                                // Phi(-|x|)
    cdf = V::blendv(q, V(1.0f) - q, x > V(0.0f));
    pdf = e * V(float(gelu::kInvSqrt2Pi));
  }
  // at::vec::maximum propagates NaN, as torch.relu does.
  static V relu(V x) { return at::vec::maximum(x, V(A(0))); }
  // A comparison gives all-ones lanes where it holds; & keeps g there and 0 elsewhere, NaN g included
  // (torch's threshold_backward selects; g * 0 would be NaN).
  static V relu_backward(V g, V x) { return g & (x > V(A(0))); }
};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
