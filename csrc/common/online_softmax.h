// The online softmax of flash attention, shared by every backend: a row's
// scores arrive block by block, and the row keeps only its running max m and
// running sum l = sum_j exp(s_j - m) instead of the whole row.
//
// When a block raises the max from m to m', everything summed so far
// (l and the output accumulator sum_j exp(s_j - m) v_j) is multiplied by
// exp(m - m') before the block's terms are added.
//
// Masked scores are -inf, and a row may have seen nothing else yet (or ever):
// then m = -inf, and exp(s - m) = exp(-inf + inf) would be NaN. So exponents
// subtract the safe max (0 in place of -inf): the masked terms become
// exp(-inf) = 0, the rescale factor of an empty row is exp(-inf - .) = 0, and
// a row that stays fully masked ends with l = 0, out = 0 and lse = +inf.
//
// NaN is never dropped, as in PyTorch: a NaN score makes the max NaN (a plain
// `a > b ? a : b` would keep the old max and treat the NaN as masked), so
// the row's sum, lse and output are NaN. A +inf score gives exp(inf - inf) =
// NaN in the same way.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace fasttx {

template <typename A>
struct OnlineSoftmax {
  A max;  // running max of the scores seen, -inf while all were masked
  A sum;  // sum_j exp(s_j - online_softmax_safe_max(max))
};

template <typename A>
FASTTX_HOST_DEVICE OnlineSoftmax<A> online_softmax_init() {
  return {-INFINITY, A(0)};
}

FASTTX_HOST_DEVICE float online_softmax_exp(float x) { return expf(x); }
FASTTX_HOST_DEVICE double online_softmax_exp(double x) { return exp(x); }
FASTTX_HOST_DEVICE float online_softmax_log(float x) { return logf(x); }
FASTTX_HOST_DEVICE double online_softmax_log(double x) { return log(x); }

// What exponents subtract: the max, or 0 while the row is fully masked.
template <typename A>
FASTTX_HOST_DEVICE A online_softmax_safe_max(A m) {
  return m == -INFINITY ? A(0) : m;
}

// max(a, b), NaN if either is NaN.
template <typename A>
FASTTX_HOST_DEVICE A online_softmax_max(A a, A b) {
  return a > b || a != a ? a : b;
}

// Raises the running max to include a block whose max is block_max (-inf if
// the block is fully masked). Returns the factor exp(m_old - m_new) that the
// caller multiplies its accumulator rows by; the running sum is rescaled here.
// The block's exponentials are then exp(s_j - online_softmax_safe_max(st.max))
// and their sum goes in with online_softmax_add.
template <typename A>
FASTTX_HOST_DEVICE A online_softmax_raise_max(OnlineSoftmax<A>& st, A block_max) {
  const A new_max = online_softmax_max(block_max, st.max);
  // m_old = -inf: nothing summed yet, factor 0 (never exp(-inf + inf)).
  const A factor = online_softmax_exp(st.max - online_softmax_safe_max(new_max));
  st.max = new_max;
  st.sum *= factor;
  return factor;
}

template <typename A>
FASTTX_HOST_DEVICE void online_softmax_add(OnlineSoftmax<A>& st, A block_sum) {
  st.sum += block_sum;
}

// Merges two partial states of one row (e.g. from two key ranges). Returns in
// *fa and *fb the factors that rescale the accumulators of a and b.
template <typename A>
FASTTX_HOST_DEVICE OnlineSoftmax<A> online_softmax_merge(OnlineSoftmax<A> a, OnlineSoftmax<A> b, A* fa, A* fb) {
  const A m = online_softmax_max(a.max, b.max);
  const A safe = online_softmax_safe_max(m);
  *fa = online_softmax_exp(a.max - safe);
  *fb = online_softmax_exp(b.max - safe);
  return {m, a.sum * *fa + b.sum * *fb};
}

// log sum_j exp(s_j): +inf for a fully masked row (sum 0), so that the
// backward's exp(s_ij - lse_i) recomputes p_ij = 0 there.
template <typename A>
FASTTX_HOST_DEVICE A online_softmax_lse(OnlineSoftmax<A> st) {
  return st.sum == A(0) ? A(INFINITY) : online_softmax_safe_max(st.max) + online_softmax_log(st.sum);
}

// 1 / l, the factor of the finished accumulator: 0 for a fully masked row,
// NaN for a NaN one.
template <typename A>
FASTTX_HOST_DEVICE A online_softmax_inv_sum(OnlineSoftmax<A> st) {
  return st.sum == A(0) ? A(0) : A(1) / st.sum;
}

}  // namespace fasttx
