// See cpu/bf16_gemm.h. Everything below the availability check is compiled
// for AVX-512 with BF16 and must only run where bf16_gemm_available().
#include "cpu/bf16_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "cpu/cpu_features.h"

#ifdef FASTTX_HAVE_VEC_ISAS
#include <immintrin.h>
#endif

namespace fasttx {

namespace {
std::atomic<bool> bf16_gemm_enabled{true};
}  // namespace

bool bf16_gemm_available() {
#ifdef FASTTX_HAVE_VEC_ISAS
  static const bool has = cpu_isa() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return has && bf16_gemm_enabled.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

bool set_bf16_gemm_enabled(bool enabled) { return bf16_gemm_enabled.exchange(enabled); }

#ifdef FASTTX_HAVE_VEC_ISAS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace {

// A word of A may sit at any 2-byte boundary (a bf16 tensor's row).
inline int load_word(const uint32_t* p) {
  int w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(n, 0)) - 1);
}

// An MR x (16 NV) tile of C; 16 MR NV accumulators stay in registers for the
// whole reduction (MR = 8, NV = 2: 16 of the 32 zmm registers).
template <int MR, int NV>
void gemm_tile(int64_t k_pairs, float alpha, const uint32_t* a, int64_t a_row, int64_t a_pair, const uint32_t* b,
               int64_t ldb, bool accumulate, float* c, int64_t ldc, int64_t cols) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k_pairs; ++p) {
    __m512i bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_si512(b + p * ldb + 16 * v);
    const uint32_t* ap = a + p * a_pair;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(load_word(ap + r * a_row));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const __mmask16 mask = first_lanes(cols - 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* cp = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], scale);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, cp));
      _mm512_mask_storeu_ps(cp, mask, x);
    }
  }
}

using TileFn = void (*)(int64_t, float, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, bool, float*,
                        int64_t, int64_t);
constexpr int kTileRows = 8;

template <int NV>
TileFn tile_for(int rows) {
  switch (rows) {
    case 1: return gemm_tile<1, NV>;
    case 2: return gemm_tile<2, NV>;
    case 3: return gemm_tile<3, NV>;
    case 4: return gemm_tile<4, NV>;
    case 5: return gemm_tile<5, NV>;
    case 6: return gemm_tile<6, NV>;
    case 7: return gemm_tile<7, NV>;
    default: return gemm_tile<8, NV>;
  }
}

// Lane e of the result takes lane e / 2 of lo (e even) or of hi (e odd): it
// interleaves two rows of 16 bf16 into 16 pairs.
inline __m512i interleave_rows(__m256i lo, __m256i hi) {
  alignas(64) static const uint16_t idx[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(lo), _mm512_load_si512(idx), _mm512_castsi256_si512(hi));
}

inline __m256i load_bf16(const float* p, __mmask16 m) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p));
}
inline __m256i load_bf16(const c10::BFloat16* p, __mmask16 m) { return _mm256_maskz_loadu_epi16(m, p); }

template <typename T>
void pack_row_pairs_impl(const T* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst, int64_t ld_dst) {
  for (int64_t p = 0; p < pairs_of(rows); ++p) {
    const T* r0 = src + 2 * p * ld;
    const T* r1 = 2 * p + 1 < rows ? r0 + ld : nullptr;
    uint32_t* out = dst + p * ld_dst;
    for (int64_t j = 0; j < ld_dst; j += 16) {
      const __mmask16 m = first_lanes(cols - j);
      const __m256i lo = load_bf16(r0 + j, m);
      const __m256i hi = r1 ? load_bf16(r1 + j, m) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(out + j, first_lanes(ld_dst - j), interleave_rows(lo, hi));
    }
  }
}

}  // namespace

void bf16_gemm(int64_t m, int64_t n, int64_t k_pairs, float alpha, const uint32_t* a, int64_t a_row,
               int64_t a_pair, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // Column panels outside, row tiles inside: a panel of B (k_pairs x 32
  // words) stays in L1/L2 while every row tile of A streams past it.
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t cols = std::min<int64_t>(32, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
      const int rows = int(std::min<int64_t>(kTileRows, m - i0));
      const TileFn tile = cols > 16 ? tile_for<2>(rows) : tile_for<1>(rows);
      tile(k_pairs, alpha, a + i0 * a_row, a_row, a_pair, b + j0, ldb, accumulate, c + i0 * ldc + j0, ldc, cols);
    }
  }
}

void pack_row_pairs(const float* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst, int64_t ld_dst) {
  pack_row_pairs_impl(src, rows, cols, ld, dst, ld_dst);
}

void pack_row_pairs(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                    int64_t ld_dst) {
  pack_row_pairs_impl(src, rows, cols, ld, dst, ld_dst);
}

void pack_transposed_pairs(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                           int64_t ld_dst) {
  // Once per head of K or V: a plain loop is cheap next to the GEMMs that
  // read the result T / block times.
  const auto bits = [](c10::BFloat16 x) { return uint32_t(x.x); };
  for (int64_t p = 0; p < pairs_of(cols); ++p) {
    uint32_t* out = dst + p * ld_dst;
    const bool has_hi = 2 * p + 1 < cols;
    for (int64_t j = 0; j < rows; ++j) {
      const c10::BFloat16* s = src + j * ld + 2 * p;
      out[j] = bits(s[0]) | (has_hi ? bits(s[1]) << 16 : 0u);
    }
    std::fill(out + rows, out + ld_dst, 0u);
  }
}

void convert_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < ld_dst; j += 16) {
      const __m256i x = load_bf16(src + i * ld + j, first_lanes(cols - j));
      _mm256_mask_storeu_epi16(dst + i * ld_dst + j, first_lanes(ld_dst - j), x);
    }
  }
}

#pragma GCC pop_options
#else
void bf16_gemm(int64_t, int64_t, int64_t, float, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, bool,
               float*, int64_t) {
  TORCH_CHECK(false, "bf16_gemm: not compiled for this CPU");
}
void pack_row_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  TORCH_CHECK(false, "pack_row_pairs: not compiled for this CPU");
}
void pack_row_pairs(const c10::BFloat16*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  TORCH_CHECK(false, "pack_row_pairs: not compiled for this CPU");
}
void pack_transposed_pairs(const c10::BFloat16*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  TORCH_CHECK(false, "pack_transposed_pairs: not compiled for this CPU");
}
void convert_rows(const float*, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "convert_rows: not compiled for this CPU");
}
#endif

}  // namespace fasttx
