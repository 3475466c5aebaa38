// softmax_kernels.h's row passes on float rows in at::vec, for one vector
// ISA: include this inside a cpu/vec/isa_begin.h region (softmax_avx2.cpp,
// softmax_avx512.cpp).
//
// exp is the row passes' hot spot (one per score). With AVX-512 it is
// vec_exp below, 12 instructions; with AVX2 ATen's exp_u20 (20 ulp), the one
// PyTorch's CPU flash attention uses. Sleef's 1-ulp exp costs about twice as
// much, and the fp32 GEMMs around it round at the 1e-7..1e-6 level anyway. It returns exactly
// 0 below log(FLT_MIN), so masked (-inf) scores drop out, and NaN for NaN, so
// that a NaN score (a NaN in q, k, the mask, or inf - inf) reaches the output
// as it does in PyTorch instead of passing for a masked one.
#pragma once

#ifdef FASTTX_ISA
#include <limits>

#include "cpu/softmax_kernels.h"
#include "cpu/vec/io.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

using Vf = at::vec::Vectorized<float>;
constexpr int64_t kW = Vf::size();

#if defined(FASTTX_ISA_AVX512)
// exp(x) = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts,
// so r is exact to fp32), e^r by a degree-5 minimax polynomial on
// |r| <= ln2 / 2: within 3e-7 relative. scalef applies 2^n with IEEE
// rounding: x is clamped to +-138 (|n| <= 200) first, so x = -inf (a masked
// score) gives exactly 0 and +inf gives +inf. min/max return their second
// operand when either is NaN: x goes second, so NaN stays NaN at no cost.
Vf vec_exp(Vf x) {
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(138.0f), _mm512_max_ps(_mm512_set1_ps(-138.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(0.008297654800117016f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04191538318991661f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16667574644088745f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49998894333839417f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999997019767761f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}
#else
// exp_u20 clamps NaN to log(FLT_MAX): one compare and blend put it back.
Vf vec_exp(Vf x) { return Vf::blendv(x.exp_u20(), x, x != x); }
#endif

float row_scale_mask_max(const float* x, const float* mask, float scale, float* s, int64_t n) {
  const Vf neg_inf(-std::numeric_limits<float>::infinity()), vscale(scale);
  Vf m = neg_inf;
  int64_t j = 0;
  if (x == s && scale == 1.0f && !mask) {  // attention's scores, scaled by the GEMM: the max only
    for (; j + kW <= n; j += kW) m = at::vec::maximum(m, Vf::loadu(x + j));
    if (j < n) m = at::vec::maximum(m, Vf::set(neg_inf, Vf::loadu(x + j, n - j), n - j));
    return lane_max(m);
  }
  for (; j + kW <= n; j += kW) {
    Vf v = Vf::loadu(x + j) * vscale;
    if (mask) v = v + Vf::loadu(mask + j);
    v.store(s + j);
    m = at::vec::maximum(m, v);
  }
  if (j < n) {
    const int64_t k = n - j;
    Vf v = Vf::loadu(x + j, k) * vscale;
    if (mask) v = v + Vf::loadu(mask + j, k);
    v.store(s + j, k);
    m = at::vec::maximum(m, Vf::set(neg_inf, v, k));
  }
  return lane_max(m);
}

float row_exp_sum(const float* x, float m, float* s, int64_t n) {
  const Vf vm(m);
  Vf sum(0.0f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vf e = vec_exp(Vf::loadu(x + j) - vm);
    e.store(s + j);
    sum = sum + e;
  }
  if (j < n) {
    const int64_t k = n - j;
    const Vf e = vec_exp(Vf::loadu(x + j, k) - vm);
    e.store(s + j, k);
    sum = sum + Vf::set(Vf(0.0f), e, k);
  }
  return lane_add(sum);
}

void row_scale(float* y, float a, int64_t n) {
  const Vf va(a);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) (Vf::loadu(y + j) * va).store(y + j);
  if (j < n) (Vf::loadu(y + j, n - j) * va).store(y + j, n - j);
}

float row_dot(const float* a, const float* b, int64_t n) {
  Vf sum(0.0f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) sum = at::vec::fmadd(Vf::loadu(a + j), Vf::loadu(b + j), sum);
  if (j < n) sum = at::vec::fmadd(Vf::loadu(a + j, n - j), Vf::loadu(b + j, n - j), sum);  // loads fill 0
  return lane_add(sum);
}

void row_softmax_grad(const float* p, const float* dp, float d, float a, float* ds, int64_t n) {
  const Vf vd(d), va(a);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) (va * Vf::loadu(p + j) * (Vf::loadu(dp + j) - vd)).store(ds + j);
  if (j < n) {
    const int64_t k = n - j;
    (va * Vf::loadu(p + j, k) * (Vf::loadu(dp + j, k) - vd)).store(ds + j, k);
  }
}

}  // namespace

extern const SoftmaxRowKernels<float> softmax_rows{row_scale_mask_max, row_exp_sum, row_scale, row_dot,
                                                   row_softmax_grad};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
