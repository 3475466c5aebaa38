// The norm family's row kernels in at::vec, for one vector ISA: include this
// inside a cpu/vec/isa_begin.h region (layer_norm_avx2.cpp, _avx512.cpp).
//
// Memory is the limit (a few flops per byte), so each kernel reads its inputs
// and writes its outputs once: a row comes from memory once and the later
// passes over it (statistics, then normalization) hit L1/L2. Statistics come
// from per-chunk moments merged with Chan's formula (csrc/common/welford.h),
// accurate when |mean| >> std.
#pragma once

#ifdef FASTTX_ISA
#include <cmath>
#include <type_traits>

#include "common/welford.h"
#include "cpu/layer_norm_driver.h"
#include "cpu/layer_norm_kernels.h"
#include "cpu/vec/io.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

constexpr int64_t kVecChunk = 2048;  // elements per exact-moment chunk: 8 KB of opmath, in L1

// Exact-ish moments of v[0, len): the chunk mean from a vector sum, then the
// centred sums about it (two passes over an L1-resident chunk). The float
// lanes round the sum by a few ulps of the mean, which rstd amplifies; the
// mean of the residuals d = v - mean corrects it, exactly on a constant chunk
// (d is then one small multiple of an ulp, summed without rounding), where the
// output must be exactly the bias. Four accumulators hide the add latency; the
// tail lanes are masked.
template <typename A>
Welford<double> chunk_moments(const A* v, int64_t len) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(0), a1(0), a2(0), a3(0);
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    a0 += V::loadu(v + j); a1 += V::loadu(v + j + W); a2 += V::loadu(v + j + 2 * W); a3 += V::loadu(v + j + 3 * W);
  }
  for (; j < len; j += W) a0 += V::loadu(v + j, std::min(W, len - j));  // loadu(p, k) zero-fills
  const A rough = static_cast<A>(lane_sum((a0 + a1) + (a2 + a3)) / double(len));
  const V vm(rough);
  V q0(0), q1(0), q2(0), q3(0), e0(0), e1(0), e2(0), e3(0);
  j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    V d0 = V::loadu(v + j) - vm, d1 = V::loadu(v + j + W) - vm;
    V d2 = V::loadu(v + j + 2 * W) - vm, d3 = V::loadu(v + j + 3 * W) - vm;
    e0 += d0; e1 += d1; e2 += d2; e3 += d3;
    q0 = at::vec::fmadd(d0, d0, q0); q1 = at::vec::fmadd(d1, d1, q1);
    q2 = at::vec::fmadd(d2, d2, q2); q3 = at::vec::fmadd(d3, d3, q3);
  }
  for (; j < len; j += W) {
    const int64_t k = std::min(W, len - j);
    const V d = V::set(V(0), V::loadu(v + j, k) - vm, k);  // lanes past the row stay 0
    e0 += d;
    q0 = at::vec::fmadd(d, d, q0);
  }
  // About mean = rough + sum(d) / len: M2 = sum(d^2) - sum(d)^2 / len.
  const double sum_d = lane_sum((e0 + e1) + (e2 + e3));
  const double m2 = lane_sum((q0 + q1) + (q2 + q3)) - sum_d * (sum_d / double(len));
  return {double(rough) + sum_d / double(len), std::max(m2, 0.0), double(len)};
}

template <typename A>
double chunk_sum_squares(const A* v, int64_t len) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V q0(0), q1(0), q2(0), q3(0);
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    V d0 = V::loadu(v + j), d1 = V::loadu(v + j + W), d2 = V::loadu(v + j + 2 * W), d3 = V::loadu(v + j + 3 * W);
    q0 = at::vec::fmadd(d0, d0, q0); q1 = at::vec::fmadd(d1, d1, q1);
    q2 = at::vec::fmadd(d2, d2, q2); q3 = at::vec::fmadd(d3, d3, q3);
  }
  for (; j < len; j += W) {
    const V d = V::loadu(v + j, std::min(W, len - j));
    q0 = at::vec::fmadd(d, d, q0);
  }
  return lane_sum((q0 + q1) + (q2 + q3));
}

// v exactly as rounded: the compiler cannot see through the empty asm, so it
// cannot fuse the product that made v into a later add. Contracted, g = dy * w
// is rounded in mean(g) but exact in g - mean(g), and the exact cancellations
// (N = 1, constant g) leave (dy*w - round(dy*w)) * rstd. (#pragma GCC optimize
// ("fp-contract=off") does not reach the lambdas of templates.) Free: no code.
template <typename V>
inline V rounded(V v) {
  constexpr bool kFloat = std::is_same_v<V, at::vec::Vectorized<float>>;
#if defined(FASTTX_ISA_AVX512)
  std::conditional_t<kFloat, __m512, __m512d> r = v;
  asm("" : "+v"(r));
#else
  std::conditional_t<kFloat, __m256, __m256d> r = v;
  asm("" : "+x"(r));
#endif
  return V(r);
}

// Asks for the next row while this one's statistics and normalization run
// over L1: without it the later passes, which touch no new lines, leave the
// hardware prefetcher idle and every row starts with a cold miss.
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

struct VecRows {
  // Rows [r0, r1). `row` is a scratch row of n opmath values, used when the row
  // must be converted (half/bfloat16) or summed with the residual first. x may
  // be stored in a narrower type TX than T (a bf16 branch added to an fp32
  // residual, res given) and y in another TY (the autocast dtype of the linear
  // that reads it): each is converted in registers, rounded once on store.
  template <typename T, typename TX = T, typename TY = T>
  static void forward_rows(const TX* x, const T* res, const T* w, const T* b, TY* y, T* s,
                           at::opmath_type<T>* mean_out, at::opmath_type<T>* rstd_out, int64_t r0, int64_t r1,
                           int64_t n, double eps, bool rms, bool stream, at::opmath_type<T>* row) {
    using IO = Io<T>;
    using A = typename IO::A;
    using V = typename IO::V;
    static_assert(std::is_same_v<A, at::opmath_type<TX>> && std::is_same_v<A, at::opmath_type<TY>>,
                  "x, y and the statistics share one opmath type");
    constexpr int64_t W = IO::W;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      if (r + 1 < r1) prefetch_row(x + off + n, n);
      if (res && r + 1 < r1) prefetch_row(res + off + n, n);
      const A* v = row;
      if (res) {
        // s is rounded to T before the statistics: the backward reads the stored
        // s back, and (s - mean) must match, or rstd amplifies the rounding.
        IO::for_each_vector(s + off, n, [&](int64_t j, int64_t k) {
          const V sv = Io<TX>::load(x + off + j, k) + IO::load(res + off + j, k);
          IO::store(s + off + j, sv, k, stream);
          IO::round_to_storage(sv).store(row + j, k);
        });
      } else if constexpr (std::is_same_v<TX, A>) {
        v = x + off;  // already opmath: read it in place, it stays in cache
      } else {
        for (int64_t j = 0; j < n; j += W)
          Io<TX>::load(x + off + j, std::min(W, n - j)).store(row + j, std::min(W, n - j));
      }
      double mean = 0, var;
      if (rms) {
        double sq = 0;
        for (int64_t c = 0; c < n; c += kVecChunk) sq += chunk_sum_squares(v + c, std::min(kVecChunk, n - c));
        var = sq / double(n);
      } else {
        Welford<double> m = welford_init<double>();
        for (int64_t c = 0; c < n; c += kVecChunk)
          m = welford_merge_scalar(m, chunk_moments(v + c, std::min(kVecChunk, n - c)));
        mean = m.mean;
        var = m.m2 / double(n);
        mean_out[r] = A(mean);
      }
      const A rstd = A(1.0 / std::sqrt(var + eps));
      rstd_out[r] = rstd;
      const V vmean(static_cast<A>(mean)), vrstd(rstd);
      Io<TY>::for_each_vector(y + off, n, [&](int64_t j, int64_t k) {
        V o = (V::loadu(v + j, k) - vmean) * vrstd;
        if (w && b) o = at::vec::fmadd(o, IO::load(w + j, k), IO::load(b + j, k));
        else if (w) o = o * IO::load(w + j, k);
        else if (b) o = o + IO::load(b + j, k);
        Io<TY>::store(y + off + j, o, k, stream);
      });
    }
    _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
  }


  // One part = a fixed range of rows [r0, r1): it writes grad_input for its rows
  // and accumulates its own dweight/dbias partial rows, so the reduction order
  // never depends on the thread count. Two passes per row, the second over data
  // the first left in L1/L2: the row sums, then grad_input. gy may be stored in
  // a narrower type TG (the grad of a bf16 y); gx_low, when given, receives
  // grad_input rounded to TL as well (the grad of a bf16 x that met an fp32
  // residual).
  template <typename T, typename TG = T, typename TL = T>
  static void backward_part(const TG* gy, const T* gs, const T* s, const at::opmath_type<T>* mean,
                            const at::opmath_type<T>* rstd, const T* w, T* gx, TL* gx_low, at::opmath_type<T>* dw,
                            at::opmath_type<T>* db, int64_t r0, int64_t r1, int64_t n, bool rms, bool stream) {
    using IO = Io<T>;
    using A = typename IO::A;
    using V = typename IO::V;
    if (dw) std::fill(dw, dw + n, A(0));
    if (db) std::fill(db, db + n, A(0));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      if (r + 1 < r1) {
        prefetch_row(gy + off + n, n);
        prefetch_row(s + off + n, n);
        if (gs) prefetch_row(gs + off + n, n);
      }
      const V mu(rms ? A(0) : mean[r]), rs(rstd[r]);
      V sum_g(0), sum_gx(0);
      IO::for_each_vector(gx + off, n, [&](int64_t j, int64_t k) {
        const V dy = Io<TG>::load(gy + off + j, k);
        const V xhat = (IO::load(s + off + j, k) - mu) * rs;
        const V g = w ? rounded(dy * IO::load(w + j, k)) : dy;
        sum_g += g;  // tail lanes load as 0, so they add nothing
        sum_gx = at::vec::fmadd(g, xhat, sum_gx);
        if (dw) at::vec::fmadd(dy, xhat, V::loadu(dw + j, k)).store(dw + j, k);
        if (db) (V::loadu(db + j, k) + dy).store(db + j, k);
      });
      const V mean_g(rms ? A(0) : A(lane_sum(sum_g) / double(n))), mean_gx(A(lane_sum(sum_gx) / double(n)));
      IO::for_each_vector(gx + off, n, [&](int64_t j, int64_t k) {
        const V dy = Io<TG>::load(gy + off + j, k);
        const V xhat = (IO::load(s + off + j, k) - mu) * rs;
        const V g = w ? rounded(dy * IO::load(w + j, k)) : dy;
        V o = (g - mean_g - xhat * mean_gx) * rs;
        if (gs) o = o + IO::load(gs + off + j, k);
        IO::store(gx + off + j, o, k, stream);
        if (gx_low) Io<TL>::store(gx_low + off + j, o, k);
      });
    }
    _mm_sfence();  // as in forward_rows
  }

  template <typename T>
  static void sum_partials(const at::opmath_type<T>* partial, int64_t parts, int64_t n, T* out) {
    FASTTX_ISA::sum_partials<T>(partial, parts, n, out);
  }
};

}  // namespace

const NormKernels norm = norm_driver::kernels<VecRows>();

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
