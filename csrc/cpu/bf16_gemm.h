// bf16 x bf16 -> fp32 block GEMMs with AVX512-BF16's dot-product instruction,
// for the bf16 flash attention of cpu/attention.cpp.
//
// Why our own: the BLAS libtorch_cpu exports (MKL's gemm_bf16bf16f32_) runs
// no faster than its sgemm on CPUs it does not tune for (measured on an AMD
// EPYC with AVX512-BF16: 35-70 GFLOP/s either way at attention's block
// shapes), ATen's oneDNN-backed bf16 GEMMs are not exported, and at::mm
// rounds its output to bf16 and costs a dispatch per small block.
//
// vdpbf16ps multiplies *pairs* of bf16 along the reduction dimension and adds
// both products to one fp32 lane. So both operands hold 32-bit words, each a
// pair (x[2p], x[2p + 1]) of consecutive reduction indices:
//   - A (m x k): word (i, p) at a[i * a_row + p * a_pair]. A bf16 row-major
//     matrix with an even row length is A with a_row = row length / 2,
//     a_pair = 1; a "row pairs" pack (below) of its transpose is A with
//     a_row = 1, a_pair = its width.
//   - B (k x n): word (p, j) at b[p * ldb + j], the "row pairs" layout. ldb
//     is a multiple of 16 and columns n .. ldb - 1 are readable (they are
//     read, never stored).
// An odd k has a last pair whose second half is 0 in both operands.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fasttx {

// True when this machine has AVX512-BF16, ATen runs its AVX-512 kernels
// (ATEN_CPU_CAPABILITY lowers that, as for the other kernel sets) and
// set_bf16_gemm_enabled(false) has not turned the path off.
bool bf16_gemm_available();
// The tests' switch, to run the fp32 fallback on a machine that has the
// instruction. Returns the previous setting.
bool set_bf16_gemm_enabled(bool enabled);

inline int64_t pairs_of(int64_t k) { return (k + 1) / 2; }
inline int64_t round_up_16(int64_t n) { return (n + 15) / 16 * 16; }

// C (m x n, row stride ldc) = alpha * A B, plus C when accumulate.
void bf16_gemm(int64_t m, int64_t n, int64_t k_pairs, float alpha, const uint32_t* a, int64_t a_row,
               int64_t a_pair, const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);

// The row pairs of src (rows x cols, row stride ld): dst[p * ld_dst + j] =
// (src[2p][j], src[2p + 1][j]) for p < pairs_of(rows), j < ld_dst, with 0 in
// place of a missing row 2p + 1 and of columns j >= cols.
void pack_row_pairs(const float* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst, int64_t ld_dst);
void pack_row_pairs(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                    int64_t ld_dst);

// The row pairs of src's transpose, for a B = src^T: dst[p * ld_dst + j] =
// (src[j][2p], src[j][2p + 1]) for p < pairs_of(cols), j < ld_dst, 0 past the
// ends.
void pack_transposed_pairs(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld, uint32_t* dst,
                           int64_t ld_dst);

// fp32 rows to bf16 (round to nearest even), each padded with 0 to ld_dst
// (even, >= cols): an A with a_row = ld_dst / 2, a_pair = 1.
void convert_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, c10::BFloat16* dst, int64_t ld_dst);

}  // namespace fasttx
