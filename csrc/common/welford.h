// Welford's running mean and variance, and Chan's merge of two partial
// states: the one place the normalization kernels get their statistics.
//
// Why Welford and not sum / sum-of-squares: E[x^2] - E[x]^2 cancels
// catastrophically when |mean| >> std (activations with a large offset), and
// fp32 then loses every digit of the variance. Welford keeps the centred M2.
//
// T is float, double or a SIMD vector (lane-wise states, merged at the end);
// the count is kept in T as well so that vector lanes merge uniformly.
#pragma once

#include "common/host_device.h"

namespace fasttx {

template <typename T>
struct Welford {
  T mean;
  T m2;     // sum of squared deviations from the mean
  T count;
};

template <typename T>
FASTTX_HOST_DEVICE Welford<T> welford_init() {
  return {T(0.0f), T(0.0f), T(0.0f)};
}

template <typename T>
FASTTX_HOST_DEVICE Welford<T> welford_update(Welford<T> s, T x) {
  T count = s.count + T(1.0f);
  T delta = x - s.mean;
  T mean = s.mean + delta / count;
  return {mean, s.m2 + delta * (x - mean), count};
}

// Chan et al.: combine two disjoint partial states. Callers that can hold an
// empty state (count 0) on both sides must guard the division themselves;
// scalar callers use welford_merge_scalar.
template <typename T>
FASTTX_HOST_DEVICE Welford<T> welford_merge(Welford<T> a, Welford<T> b) {
  T count = a.count + b.count;
  T delta = b.mean - a.mean;
  T b_share = b.count / count;
  return {a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share, count};
}

template <typename T>
FASTTX_HOST_DEVICE Welford<T> welford_merge_scalar(Welford<T> a, Welford<T> b) {
  if (b.count == T(0.0f)) return a;
  if (a.count == T(0.0f)) return b;
  return welford_merge(a, b);
}

}  // namespace fasttx
