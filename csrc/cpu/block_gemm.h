// Our own small GEMMs for the blocks of cpu/attention.cpp: fp32 x fp32 and
// bf16 x bf16, both accumulating in fp32 in AVX-512 registers.
//
// Why not BLAS: attention's blocks are small (64-512 rows, k = 64-512) and
// half of them read an operand transposed. MKL's sgemm_, which libtorch_cpu
// exports, ran them at 31-71 GFLOP/s on one AMD EPYC core against 83 for a
// 1024^3 GEMM. For bf16, its gemm_bf16bf16f32_ runs no faster than sgemm on
// CPUs it does not tune for, ATen's oneDNN-backed bf16 GEMMs are not
// exported, and at::mm rounds its output to bf16 and costs a dispatch per
// block.
//
// One register tile (8 rows x 32 columns, 16 zmm accumulators) serves both:
//   - fp32: C += A B with A (m x k) at a[i * a_row + kk * a_col], so a
//     transposed A is just a_row = 1, a_col = its row length; B (k x n)
//     row-major with row stride ldb.
//   - bf16: vdpbf16ps multiplies *pairs* of bf16 along the reduction
//     dimension, so both operands hold 32-bit words, each a pair
//     (x[2p], x[2p + 1]) of consecutive reduction indices. A's word (i, p) is
//     at a[i * a_row + p * a_col]: a bf16 row-major matrix with an even row
//     length is A with a_row = row length / 2, a_col = 1, and a "row pairs"
//     pack (below) of its transpose is A with a_row = 1, a_col = its width.
//     B's word (p, j) is at b[p * ldb + j], the "row pairs" layout. An odd k
//     has a last pair whose second half is 0 in both operands.
// Each C element is summed in a fixed order that depends on k alone: the
// results do not depend on threads, alignment or the other dimensions.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fasttx {

// True when ATen runs its AVX-512 kernels here (ATEN_CPU_CAPABILITY lowers
// that, as for the other kernel sets) and our GEMMs are enabled: by default
// where the CPU is not Intel's (MKL's own), else as FASTTX_ATTENTION_GEMM=
// block|blas or set_block_gemm_enabled says; the bf16 one also needs
// AVX512-BF16.
bool block_gemm_available();
bool bf16_block_gemm_available();
// The tests' switch, to run the BLAS fallback on a machine that has the
// instructions. Returns the previous setting.
bool set_block_gemm_enabled(bool enabled);
// bf16 attention on oneDNN's brgemm (at::native::cpublas): where ATen runs it
// natively (AMX or AVX512-BF16) and FASTTX_ATTENTION_GEMM is unset or
// brgemm. It takes precedence over bf16_block_gemm. The switch is the tests'.
bool bf16_brgemm_available();
bool set_bf16_brgemm_enabled(bool enabled);

inline int64_t pairs_of(int64_t k) { return (k + 1) / 2; }
inline int64_t round_up_16(int64_t n) { return (n + 15) / 16 * 16; }

// C (m x n, row stride ldc) = alpha * A B, plus C when accumulate.
void block_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_row, int64_t a_col,
                const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);
void bf16_block_gemm(int64_t m, int64_t n, int64_t k_pairs, float alpha, const uint32_t* a, int64_t a_row,
                     int64_t a_col, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);

// dst[kk * ld_dst + j] = src[j * ld + kk]: src (rows x cols) transposed, for
// a B = src^T of block_gemm.
void pack_transposed(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t ld_dst);

// The row pairs of src (rows x cols, row stride ld): dst[p * ld_dst + j] =
// (src[2p][j], src[2p + 1][j]) for p < pairs_of(rows), j < ld_dst, with 0 in
// place of a missing row 2p + 1 and of columns j >= cols.
void pack_row_pairs(const float* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst, int64_t ld_dst);
void pack_row_pairs(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                    int64_t ld_dst);

// The row pairs of src's transpose, for a B = src^T: dst[p * ld_dst + j] =
// (src[j][2p], src[j][2p + 1]) for p < cols / 2, j < ld_dst, 0 past the rows.
// cols must be even (the bf16 attention paths serve even head dims only).
void pack_transposed_pairs(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                           int64_t ld_dst);

// fp32 rows times scale to bf16 (round to nearest even), each padded with 0
// to ld_dst (even, >= cols): an A with a_row = ld_dst / 2, a_col = 1.
void convert_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst, int64_t ld_dst,
                  float scale = 1.f);

// dst[d * ld_dst + i] = src[i * ld + d]: a bf16 (rows x cols) block, cols
// even, transposed (16 x 16 blocks of column pairs in AVX-512 registers).
// Needs bf16_transpose_available() (AVX512-BF16, the region's target).
bool bf16_transpose_available();
void transpose_bf16(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst,
                    int64_t ld_dst);

// transpose_bf16, then zero-padded to ld_dst (>= rows) columns.
void transpose_rows(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst,
                    int64_t ld_dst);

// dst[j * ld_dst + d] = bf16(scale * src[d * ld + j]): an fp32 (rows x cols)
// block stored transposed into bf16 rows.
void store_transposed(const float* src, int64_t rows, int64_t cols, int64_t ld, float scale, c10::BFloat16* dst,
                      int64_t ld_dst);

}  // namespace fasttx
