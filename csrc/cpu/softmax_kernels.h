// The row passes of softmax, shared by the softmax op (softmax.cpp) and the
// flash attention kernels (attention.cpp) between their GEMMs: one set of
// at::vec kernels per ISA for float rows (softmax_vec.h, built by
// softmax_avx2.cpp and softmax_avx512.cpp) and portable loops for any type
// (float where there is no vector set, double always: gradcheck's rows).
//
// Every pass works on an opmath row of n elements; rows are short-lived
// fp32 (fp64) buffers or fp32 inputs, never bf16/fp16 storage.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/cpu_features.h"

namespace fasttx {

template <typename A>
struct SoftmaxRowKernels {
  // s[j] = scale * x[j] + mask[j] (mask may be null; s may be x); returns
  // max_j s[j], -inf for n = 0, NaN if some s[j] is NaN.
  A (*scale_mask_max)(const A* x, const A* mask, A scale, A* s, int64_t n);
  // s[j] = exp(x[j] - m) (s may be x); returns sum_j s[j]. exp(-inf) = 0,
  // exp(NaN) = NaN.
  A (*exp_sum)(const A* x, A m, A* s, int64_t n);
  // y[j] *= a.
  void (*scale)(A* y, A a, int64_t n);
  // sum_j a[j] * b[j].
  A (*dot)(const A* a, const A* b, int64_t n);
  // ds[j] = a * p[j] * (dp[j] - d) (ds may be dp): softmax's backward.
  void (*softmax_grad)(const A* p, const A* dp, A d, A a, A* ds, int64_t n);
};

namespace portable {

template <typename A>
A scale_mask_max(const A* x, const A* mask, A scale, A* s, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    s[j] = scale * x[j] + (mask ? mask[j] : A(0));
    m = s[j] > m || s[j] != s[j] ? s[j] : m;  // NaN wins, as in at::vec::maximum (std::max would drop it)
  }
  return m;
}

template <typename A>
A exp_sum(const A* x, A m, A* s, int64_t n) {
  A sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(x[j] - m);
    sum += s[j];
  }
  return sum;
}

template <typename A>
void scale(A* y, A a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

template <typename A>
A dot(const A* a, const A* b, int64_t n) {
  A sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

template <typename A>
void softmax_grad(const A* p, const A* dp, A d, A a, A* ds, int64_t n) {
  for (int64_t j = 0; j < n; ++j) ds[j] = a * p[j] * (dp[j] - d);
}

template <typename A>
inline constexpr SoftmaxRowKernels<A> softmax_rows{scale_mask_max<A>, exp_sum<A>, scale<A>, dot<A>,
                                                   softmax_grad<A>};

}  // namespace portable

namespace avx2 { extern const SoftmaxRowKernels<float> softmax_rows; }
namespace avx512 { extern const SoftmaxRowKernels<float> softmax_rows; }

// The row kernels of this CPU for opmath type A.
template <typename A>
const SoftmaxRowKernels<A>& softmax_row_kernels() {
  if constexpr (std::is_same_v<A, float>) {
    switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
      case CpuIsa::kAvx512: return avx512::softmax_rows;
      case CpuIsa::kAvx2: return avx2::softmax_rows;
#endif
      default: break;
    }
  }
  return portable::softmax_rows<A>;
}

}  // namespace fasttx
