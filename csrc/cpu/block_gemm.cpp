// See cpu/block_gemm.h. Everything below the availability checks is compiled
// for AVX-512 (with BF16) and must only run where they say so.
#include "cpu/block_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu/cpu_features.h"

#ifdef FASTTX_HAVE_VEC_ISAS
#include <immintrin.h>
#endif

namespace fasttx {

namespace {
// FASTTX_ATTENTION_GEMM: "" (the defaults below), block, blas or brgemm.
enum class GemmChoice { kDefault, kBlock, kBlas, kBrgemm };

GemmChoice gemm_choice_from_env() {
  const char* v = std::getenv("FASTTX_ATTENTION_GEMM");
  if (!v || !*v) return GemmChoice::kDefault;
  if (std::strcmp(v, "block") == 0) return GemmChoice::kBlock;
  if (std::strcmp(v, "blas") == 0) return GemmChoice::kBlas;
  if (std::strcmp(v, "brgemm") == 0) return GemmChoice::kBrgemm;
  TORCH_CHECK(false, "FASTTX_ATTENTION_GEMM must be 'block', 'blas' or 'brgemm', got '", v, "'");
}

// MKL, the BLAS libtorch_cpu exports, runs its tuned kernels on Intel CPUs,
// and there it beat these GEMMs at every attention shape measured (2 cores of
// an AVX-512/AMX Xeon, causal, forward+backward: fp32 (8, 6, 256, 64) 9.7 vs
// 10.5 ms, (4, 12, 1024, 64) 104 vs 113 ms; bf16 on fp32 copies 10.0 vs
// 13.9 ms and 104 vs 146 ms). On AMD EPYC ours won (below). So by default
// ours serve where the CPU is not Intel's.
bool block_gemm_by_default() {
  switch (gemm_choice_from_env()) {
    case GemmChoice::kBlock: return true;
    case GemmChoice::kBlas: return false;
    default: break;
  }
  return !cpu_is_intel();
}

// Decided on first use, so that a bad FASTTX_ATTENTION_GEMM raises there, not at load time.
std::atomic<bool>& block_gemm_enabled() {
  static std::atomic<bool> enabled{block_gemm_by_default()};
  return enabled;
}

// bf16 attention on oneDNN's brgemm wherever ATen can run it natively, unless
// FASTTX_ATTENTION_GEMM asks for block or blas. With AMX tiles it ran a
// (64 x 64) x (64 x 256) block at 1.1 TFLOP/s on one Xeon core, where MKL's
// sgemm on fp32 copies ran 0.21.
std::atomic<bool>& brgemm_enabled() {
  static std::atomic<bool> enabled{[] {
    const GemmChoice choice = gemm_choice_from_env();
    return choice == GemmChoice::kDefault || choice == GemmChoice::kBrgemm;
  }()};
  return enabled;
}

bool has_avx512_bf16() {
#ifdef FASTTX_HAVE_VEC_ISAS
  static const bool has = cpu_isa() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}
}  // namespace

bool block_gemm_available() {
  return cpu_isa() == CpuIsa::kAvx512 && block_gemm_enabled().load(std::memory_order_relaxed);
}

bool bf16_block_gemm_available() { return has_avx512_bf16() && block_gemm_available(); }

bool bf16_transpose_available() { return has_avx512_bf16(); }

bool bf16_brgemm_available() {
  // The packing helpers below use AVX512-BF16; could_pack says oneDNN has a
  // native bf16 brgemm here (AMX or AVX512-BF16), not a reference loop.
  static const bool runnable = has_avx512_bf16() && at::native::cpublas::could_pack(at::kBFloat16);
  return runnable && brgemm_enabled().load(std::memory_order_relaxed);
}

bool set_bf16_brgemm_enabled(bool enabled) { return brgemm_enabled().exchange(enabled); }

bool set_block_gemm_enabled(bool enabled) { return block_gemm_enabled().exchange(enabled); }

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

// The two element kinds of the tile: what one A element, one B vector and
// one multiply-add are.
struct Fp32Fma {
  using Elem = float;
  using Vec = __m512;
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

struct Bf16PairDot {
  using Elem = uint32_t;
  using Vec = __m512i;
  static Vec broadcast(const uint32_t* p) { return _mm512_set1_epi32(load_word(p)); }
  static Vec load(const uint32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

// An MR x (16 NV) tile of C; 16 MR NV accumulators stay in registers for the
// whole reduction (MR = 8, NV = 2: 16 of the 32 zmm registers).
template <typename Op, int MR, int NV>
void gemm_tile(int64_t k, float alpha, const typename Op::Elem* a, int64_t a_row, int64_t a_col,
               const typename Op::Elem* b, int64_t ldb, bool accumulate, float* c, int64_t ldc, int64_t cols) {
  __mmask16 mask[NV];
  __m512 acc[MR][NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) mask[v] = first_lanes(cols - 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    typename Op::Vec bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = Op::load(b + kk * ldb + 16 * v, mask[v]);
    const typename Op::Elem* ak = a + kk * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const typename Op::Vec av = Op::broadcast(ak + r * a_row);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = Op::madd(acc[r][v], av, bv[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* cp = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], scale);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], cp));
      _mm512_mask_storeu_ps(cp, mask[v], x);
    }
  }
}

template <typename Op>
using TileFn = void (*)(int64_t, float, const typename Op::Elem*, int64_t, int64_t, const typename Op::Elem*, int64_t,
                        bool, float*, int64_t, int64_t);
constexpr int kTileRows = 8;

template <typename Op, int NV>
TileFn<Op> tile_for(int rows) {
  switch (rows) {
    case 1: return gemm_tile<Op, 1, NV>;
    case 2: return gemm_tile<Op, 2, NV>;
    case 3: return gemm_tile<Op, 3, NV>;
    case 4: return gemm_tile<Op, 4, NV>;
    case 5: return gemm_tile<Op, 5, NV>;
    case 6: return gemm_tile<Op, 6, NV>;
    case 7: return gemm_tile<Op, 7, NV>;
    default: return gemm_tile<Op, 8, NV>;
  }
}

template <typename Op>
void gemm_tiles(int64_t m, int64_t n, int64_t k, float alpha, const typename Op::Elem* a, int64_t a_row,
                int64_t a_col, const typename Op::Elem* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // Column panels outside, row tiles inside: a panel of B (k x 32) stays in
  // L1/L2 while every row tile of A streams past it.
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t cols = std::min<int64_t>(32, n - j0);
    for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
      const int rows = int(std::min<int64_t>(kTileRows, m - i0));
      const TileFn<Op> tile = cols > 16 ? tile_for<Op, 2>(rows) : tile_for<Op, 1>(rows);
      tile(k, alpha, a + i0 * a_row, a_row, a_col, b + j0, ldb, accumulate, c + i0 * ldc + j0, ldc, cols);
    }
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

// r[i] holds row i of a 16 x 16 block of 32-bit words; afterwards r[c] holds
// column c: pairs of rows interleaved, then 64-bit halves, then 128-bit lanes.
// GCC 12's unpack, shift and narrowing intrinsics pass an
// _mm512_undefined_epi32() through, which it reports as maybe uninitialized
// wherever they inline (down to the end of this file's AVX-512 region);
// every lane used here is defined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], lane k: column 4k + c of rows g..g+3
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// Calls store(j0 + c, i0, rows in block, column c of the block) for every
// 16 x 16 block of a (rows x cols) matrix of 32-bit words, row i at
// src + i * ld_bytes (any alignment): the block transposed in registers.
template <typename Store>
void for_each_transposed_block(const void* src, int64_t rows, int64_t cols, int64_t ld_bytes, const Store& store) {
  const auto* base = static_cast<const char*>(src);
  __m512i r[16];
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int64_t ni = std::min<int64_t>(16, rows - i0);
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, cols - j0);
      const __mmask16 mj = first_lanes(nj);
      for (int i = 0; i < 16; ++i) {
        r[i] = i < ni ? _mm512_maskz_loadu_epi32(mj, base + (i0 + i) * ld_bytes + j0 * 4) : _mm512_setzero_si512();
      }
      transpose_16x16(r);
      for (int c = 0; c < nj; ++c) store(j0 + c, i0, ni, r[c]);
    }
  }
}

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

void block_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_row, int64_t a_col,
                const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  gemm_tiles<Fp32Fma>(m, n, k, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

void bf16_block_gemm(int64_t m, int64_t n, int64_t k_pairs, float alpha, const uint32_t* a, int64_t a_row,
                     int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  gemm_tiles<Bf16PairDot>(m, n, k_pairs, alpha, a, a_row, a_col, b, ldb, accumulate, c, ldc);
}

void pack_transposed(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t ld_dst) {
  // Once per head of K or V, like pack_transposed_pairs.
  for (int64_t kk = 0; kk < cols; ++kk) {
    float* out = dst + kk * ld_dst;
    for (int64_t j = 0; j < rows; ++j) out[j] = src[j * ld + kk];
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
  // Once per head of K or V: word (p, j) is the pair at src[j][2p], so this is
  // src's rows read as words, transposed.
  TORCH_CHECK(cols % 2 == 0, "pack_transposed_pairs: cols must be even, got ", cols);
  for_each_transposed_block(src, rows, cols / 2, ld * int64_t(sizeof(c10::BFloat16)),
                            [&](int64_t p, int64_t j0, int64_t n, __m512i words) {
                              _mm512_mask_storeu_epi32(dst + p * ld_dst + j0, first_lanes(n), words);
                            });
  for (int64_t p = 0; p < cols / 2; ++p) std::fill(dst + p * ld_dst + rows, dst + (p + 1) * ld_dst, 0u);
}

void convert_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst, int64_t ld_dst,
                  float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < ld_dst; j += 16) {
      const __m512 v = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(first_lanes(cols - j), src + i * ld + j));
      const __m256i x = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(dst + i * ld_dst + j, first_lanes(ld_dst - j), x);
    }
  }
}

void transpose_bf16(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst,
                    int64_t ld_dst) {
  // src's rows read as words (column pairs), transposed, each word column
  // split into output rows 2p (low halves) and 2p + 1.
  TORCH_CHECK(cols % 2 == 0, "transpose_bf16: cols must be even, got ", cols);
  for_each_transposed_block(src, rows, cols / 2, ld * int64_t(sizeof(c10::BFloat16)),
                            [&](int64_t p, int64_t i0, int64_t n, __m512i words) {
                              c10::BFloat16* lo = dst + 2 * p * ld_dst + i0;
                              _mm256_mask_storeu_epi16(lo, first_lanes(n), _mm512_cvtepi32_epi16(words));
                              _mm256_mask_storeu_epi16(lo + ld_dst, first_lanes(n),
                                                       _mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16)));
                            });
}

void transpose_rows(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst,
                    int64_t ld_dst) {
  transpose_bf16(src, rows, cols, ld, dst, ld_dst);  // per block of query rows
  for (int64_t d = 0; d < cols; ++d) std::fill(dst + d * ld_dst + rows, dst + (d + 1) * ld_dst, c10::BFloat16(0.f));
}

void store_transposed(const float* src, int64_t rows, int64_t cols, int64_t ld, float scale, c10::BFloat16* dst,
                      int64_t ld_dst) {
  // Once per kv head: 16 x 16 blocks transposed in registers, each column
  // (16 of src's rows) rounded to bf16 and stored as part of a row of dst.
  const __m512 s = _mm512_set1_ps(scale);
  for_each_transposed_block(src, rows, cols, ld * int64_t(sizeof(float)),
                            [&](int64_t j, int64_t d0, int64_t n, __m512i column) {
                              const __m512 v = _mm512_mul_ps(s, _mm512_castsi512_ps(column));
                              _mm256_mask_storeu_epi16(dst + j * ld_dst + d0, first_lanes(n),
                                                       (__m256i)_mm512_cvtneps_pbh(v));
                            });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
void block_gemm(int64_t, int64_t, int64_t, float, const float*, int64_t, int64_t, const float*, int64_t, bool, float*,
                int64_t) {
  TORCH_CHECK(false, "block_gemm: not compiled for this CPU");
}
void bf16_block_gemm(int64_t, int64_t, int64_t, float, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t,
                     bool, float*, int64_t) {
  TORCH_CHECK(false, "bf16_block_gemm: not compiled for this CPU");
}
void pack_transposed(const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "pack_transposed: not compiled for this CPU");
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
void convert_rows(const float*, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t, float) {
  TORCH_CHECK(false, "convert_rows: not compiled for this CPU");
}
void transpose_bf16(const c10::BFloat16*, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "transpose_bf16: not compiled for this CPU");
}
void transpose_rows(const c10::BFloat16*, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "transpose_rows: not compiled for this CPU");
}
void store_transposed(const float*, int64_t, int64_t, int64_t, float, c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "store_transposed: not compiled for this CPU");
}
#endif

}  // namespace fasttx
