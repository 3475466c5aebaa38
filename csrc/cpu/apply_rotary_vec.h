// Rotary embedding kernels in at::vec, for one vector ISA: include this inside
// a cpu/vec/isa_begin.h region (apply_rotary_avx2.cpp, apply_rotary_avx512.cpp).
//
// Memory-bound: each row of q and k is read once through its strides and its
// rotation written once, in fp32 (fp64 for fp64) and rounded once. The tables'
// rows are re-read per head from cache. Rotate-half pairs element j with
// j + Dr/2, so both halves load as plain vectors; interleaved pairs are
// adjacent lanes, rotated with one in-register lane swap instead of strided
// (de-interleaving) loads.
#pragma once

#ifdef FASTTX_ISA
#include <ATen/Dispatch.h>

#include <cstring>
#include <type_traits>

#include "cpu/apply_rotary_kernels.h"
#include "cpu/vec/io.h"

namespace fasttx {
namespace FASTTX_ISA {
namespace {

// (v1, v0, v3, v2, ...): each adjacent pair's lanes exchanged.
template <typename A>
at::vec::Vectorized<A> swap_pairs(at::vec::Vectorized<A> v) {
#if defined(FASTTX_ISA_AVX512)
  if constexpr (std::is_same_v<A, float>) return _mm512_permute_ps(v, 0xB1);
  else return _mm512_permute_pd(v, 0x55);
#else
  if constexpr (std::is_same_v<A, float>) return _mm256_permute_ps(v, 0xB1);
  else return _mm256_permute_pd(v, 0x5);
#endif
}

// (-1, +1, -1, +1, ...): the sign of the rotated partner in each pair, R(a, b) = (-b, a).
template <typename A>
at::vec::Vectorized<A> pair_signs() {
  using V = at::vec::Vectorized<A>;
  alignas(64) A s[V::size()];
  for (int64_t i = 0; i < V::size(); ++i) s[i] = i % 2 ? A(1) : A(-1);
  return V::loadu(s);
}

// One row: y = x*c + R(x)*s forward; y = c*x - R(s*x) (the transposed rotation) backward.
template <typename T, typename C>
void rotate_row(const T* x, T* y, const C* c, const C* s, int64_t dim, int64_t rot_dim, bool interleaved,
                bool transpose, bool stream) {
  using IO = Io<T>;
  using CIO = Io<C>;
  using V = typename IO::V;
  static_assert(std::is_same_v<V, typename CIO::V>, "the table type must share T's opmath type");
  if (interleaved) {
    const V sign = pair_signs<typename IO::A>();
    for (int64_t j = 0; j < rot_dim; j += IO::W) {
      const int64_t k = std::min(IO::W, rot_dim - j);  // even: rot_dim and W are
      const V xv = IO::load(x + j, k), cv = CIO::load(c + j, k), sv = CIO::load(s + j, k);
      const V out = transpose ? cv * xv - sign * swap_pairs(sv * xv) : cv * xv + sign * (swap_pairs(xv) * sv);
      IO::store(y + j, out, k, stream);
    }
  } else {
    const int64_t half = rot_dim / 2;
    for (int64_t j = 0; j < half; j += IO::W) {
      const int64_t k = std::min(IO::W, half - j);
      const V x1 = IO::load(x + j, k), x2 = IO::load(x + half + j, k);
      const V c1 = CIO::load(c + j, k), c2 = CIO::load(c + half + j, k);
      const V s1 = CIO::load(s + j, k), s2 = CIO::load(s + half + j, k);
      // R(x1, x2) = (-x2, x1); R^T(g1, g2) = (g2, -g1).
      const V y1 = transpose ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
      const V y2 = transpose ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
      IO::store(y + j, y1, k, stream);
      IO::store(y + half + j, y2, k, stream);
    }
  }
  if (rot_dim < dim) std::memcpy(y + rot_dim, x + rot_dim, (dim - rot_dim) * sizeof(T));
}

template <typename T, typename C>
void run_typed(const RotaryArgs& a, bool stream) {
  for_each_rotary_row<T, C>(
      a, [&](const T* x, T* y, const C* c, const C* s) {
        rotate_row(x, y, c, s, a.dim, a.rot_dim, a.interleaved, a.transpose, stream);
      },
      [&] {
        if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
      });
}

}  // namespace

void run(const RotaryArgs& args, at::ScalarType dtype, bool table_is_float, bool stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "apply_rotary_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      run_typed<scalar_t, scalar_t>(args, stream);
    } else {
      if (table_is_float) run_typed<scalar_t, float>(args, stream);
      else run_typed<scalar_t, scalar_t>(args, stream);
    }
  });
}

const ApplyRotaryKernels apply_rotary{&run};

}  // namespace FASTTX_ISA
}  // namespace fasttx
#endif  // FASTTX_ISA
