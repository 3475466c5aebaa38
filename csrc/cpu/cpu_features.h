// What the CPU kernels may assume about the machine they run on, and the
// allocation policy they share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>

namespace fasttx {

// The vector ISA the kernels of cpu/vec/isa_begin.h regions may use here.
enum class CpuIsa { kScalar, kAvx2, kAvx512 };

// Where those regions are compiled at all (x86-64, GCC).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTTX_HAVE_VEC_ISAS 1
#endif

// Follows ATen's choice, which honours ATEN_CPU_CAPABILITY=avx2|default: the
// tests use it to run the AVX2 and the portable kernels on any machine.
inline CpuIsa cpu_isa() {
#ifdef FASTTX_HAVE_VEC_ISAS
  static const CpuIsa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return CpuIsa::kAvx512;
    if (cap == "AVX2") return CpuIsa::kAvx2;
    return CpuIsa::kScalar;
  }();
  return isa;
#else
  return CpuIsa::kScalar;
#endif
}

// Whether the CPU is Intel's: MKL, ATen's fp32 BLAS, runs its tuned kernels
// there only, so the attention (cpu/block_gemm.h) and the linears
// (cpu/matmul.h) keep MKL on Intel CPUs and take other GEMMs elsewhere.
inline bool cpu_is_intel() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

// Whether an output of this many bytes is written with streaming stores (see
// cpu/vec/io.h). They skip reading each destination line before overwriting
// it and bypass the cache: right for outputs the cache cannot hold, wrong for
// those it can, which the next op then reads from cache.
// - Forward outputs stream past 3/4 of the last-level cache (glibc memcpy's
//   rule for non-temporal stores), and from 16 MB at least. On a 2-core slice
//   of a 480 MB-L3 Xeon, plain stores made the forwards of bias_gelu (100 MB
//   out) and layer_norm (67 MB) 1.1-1.4x faster than streaming ones.
// - Backward outputs stream from 16 MB: there the working set is twice the
//   forward's (saved input, incoming and outgoing gradients), and on that
//   machine plain stores won for bias_gelu but lost for layer_norm.
// FASTTX_STREAM_BYTES=<bytes> sets one threshold for both (tests force 0).
bool stream_forward_output(int64_t bytes);
bool stream_backward_output(int64_t bytes);

// Row parts of every deterministic column reduction (grad_bias, dweight,
// dbias): fixed-order partial sums over row ranges that are a function of
// the row count alone, so the result is bitwise reproducible whatever the
// thread count.
inline int64_t column_sum_parts(int64_t rows) {
  constexpr int64_t kMaxParts = 64, kMinPartRows = 16;
  return std::max<int64_t>(1, std::min(kMaxParts, rows / kMinPartRows));
}

// A fresh output tensor for a kernel that writes all of it. Above glibc's
// 32 MB mmap threshold a fresh block costs one page fault per 4 KB on first
// touch; asking for transparent huge pages (THP "madvise" mode) cuts that
// 512-fold. Advisory only: if it fails, 4 KB pages are used.
// FASTTX_HUGE_PAGES=0 turns it off (where huge pages come back slowly, say).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
inline at::Tensor empty_output(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

}  // namespace fasttx
