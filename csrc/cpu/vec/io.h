// Vector loads and stores between a storage type T and its opmath type
// (float for float/half/bfloat16, double for double), and the fixed-order
// partial-sum reduction, for kernels inside a cpu/vec/isa_begin.h region.
#pragma once

#ifdef FASTTX_ISA
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_features.h"

namespace fasttx {
namespace FASTTX_ISA {

// Moves one register of opmath values from and to T; k < size() handles a
// row's tail with masked loads/stores (loads fill the lanes past k with 0).
// Outputs too big to stay in cache are written with streaming stores: they
// skip reading each destination line before overwriting it, a third of the
// traffic.
template <typename T>
struct Io {
  using A = at::opmath_type<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int64_t W = V::size();
  static constexpr uintptr_t kStoreBytes = W * sizeof(T);  // alignment a stream store needs

  static V load(const T* p, int64_t k = W) {
    if constexpr (std::is_same_v<T, A>) return V::loadu(p, k);
    else return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, k)));
  }
  static void store(T* p, V v, int64_t k = W, bool stream = false) {
    const bool streamable = stream && k == W && reinterpret_cast<uintptr_t>(p) % kStoreBytes == 0;
    if constexpr (std::is_same_v<T, A>) {
      if (!streamable) v.store(p, k);
      else stream_store(p, v);
    } else {
      // Converted, the register holds 2W values of T of which the low W are ours.
      auto r = at::vec::convert_from_float<T>(v, v);
      if (!streamable) r.store(p, k);
      else stream_store_low_half(p, r);
    }
  }
  // v rounded to T and back: the value a store to T and a load would give.
  static V round_to_storage(V v) {
    if constexpr (std::is_same_v<T, A>) return v;
    else return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
  // Calls f(j, k) over [0, len) in steps of k <= W elements; the first step is
  // shortened so that every later full step of `out` is aligned for streaming.
  template <typename F>
  static void for_each_vector(const T* out, int64_t len, const F& f) {
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(out) % kStoreBytes;
    const auto head = int64_t((kStoreBytes - misalign) % kStoreBytes / sizeof(T));
    for (int64_t j = 0, k = head ? head : W; j < len; j += k, k = W) f(j, std::min(k, len - j));
  }

 private:
  static void stream_store(A* p, V v) {
#if defined(FASTTX_ISA_AVX512)
    if constexpr (std::is_same_v<A, float>) _mm512_stream_ps(p, v);
    else _mm512_stream_pd(p, v);
#else
    if constexpr (std::is_same_v<A, float>) _mm256_stream_ps(p, v);
    else _mm256_stream_pd(p, v);
#endif
  }
  template <typename R>
  static void stream_store_low_half(T* p, R r) {
#if defined(FASTTX_ISA_AVX512)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(r));
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(r));
#endif
  }
};

// The max (NaN if a lane is NaN) and the float sum of a float register's lanes, in a fixed order.
inline float lane_max(at::vec::Vectorized<float> v) {
  using Vf = at::vec::Vectorized<float>;
  return at::vec::vec_reduce_all<float>([](Vf a, Vf b) { return at::vec::maximum(a, b); }, v);
}
inline float lane_add(at::vec::Vectorized<float> v) {
  using Vf = at::vec::Vectorized<float>;
  return at::vec::vec_reduce_all<float>([](Vf a, Vf b) { return a + b; }, v);
}

// Sum of the lanes of v in double, in a fixed tree order. A few shuffles: a
// lane-by-lane scalar sum is a chain of 16 dependent adds, which cost as much
// as the vector work of a whole 768-element row in the norm kernels.
template <typename A>
double lane_sum(at::vec::Vectorized<A> v) {
#if defined(FASTTX_ISA_AVX512)
  __m512d d;
  if constexpr (std::is_same_v<A, float>) {
    const __m512 f = v;
    d = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(f)),
                      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
  } else {
    d = v;
  }
  const __m256d q = _mm256_add_pd(_mm512_castpd512_pd256(d), _mm512_extractf64x4_pd(d, 1));
#else
  __m256d q;
  if constexpr (std::is_same_v<A, float>) {
    const __m256 f = v;
    q = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  } else {
    q = v;
  }
#endif
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// out[j] = sum over k of part[k * n + j], added in k order whatever the thread
// count: the last step of every deterministic column reduction (grad_bias,
// grad_weight) over fixed row chunks.
template <typename T>
void sum_partials(const at::opmath_type<T>* part, int64_t chunks, int64_t n, T* out) {
  using IO = Io<T>;
  at::parallel_for(0, n, std::max<int64_t>(1, at::internal::GRAIN_SIZE / chunks), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += IO::W) {
      const int64_t kk = std::min(IO::W, j1 - j);
      auto s = IO::V::loadu(part + j, kk);
      for (int64_t k = 1; k < chunks; ++k) s = s + IO::V::loadu(part + k * n + j, kk);
      IO::store(out + j, s, kk);
    }
  });
}

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
