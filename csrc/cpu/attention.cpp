// Flash attention on the CPU (see csrc/ops.h for the contract).
//
// Forward: one task per (batch, q head, block of query rows). A task walks
// the key blocks with two BLAS GEMMs each (S = scale Q K^T, acc += P V) and
// keeps only the online softmax state of its rows (common/online_softmax.h)
// in between: O(block) memory, never a Tq x Tk matrix.
//
// Backward: one task per (batch, kv head). It loops over the q heads of its
// group and their query blocks, recomputes P = exp(S - lse) block by block and
// accumulates dQ of the block and dK, dV of the whole kv head in fp32 (the
// output tensors themselves for fp32, task-local buffers for bf16/fp16). No
// two tasks write the same rows, each sums in a fixed order and BLAS runs
// single-threaded inside a task, so the gradients are bitwise the same
// whatever the thread count.
//
// The GEMMs call the BLAS that libtorch_cpu exports (MKL's sgemm_/dgemm_),
// the routine at::native::cpublas::gemm calls: its float/double overloads are
// not exported, and at::mm_out's dispatch costs more than a small block GEMM.
// bf16/fp16 blocks are converted to fp32 first: fp32 accumulation is the
// contract. On CPUs with AVX512-BF16 or AMX a bf16 GEMM with fp32 accumulation
// (libtorch_cpu also exports MKL's gemm_bf16bf16f32_) would be faster for bf16;
// not done yet.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/online_softmax.h"
#include "common/philox.h"
#include "cpu/softmax_kernels.h"

#if AT_BUILD_WITH_BLAS()
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}
#endif
#if AT_MKL_ENABLED()
// MKL's C entry point (the lower-case name is the Fortran one, taking a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int nthreads);
#endif

namespace fasttx {
namespace {

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(A) m x k. BLAS is
// column-major, where a row-major matrix is its transpose: so it computes
// C^T = op(B)^T op(A)^T.
template <typename A>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if AT_BUILD_WITH_BLAS()
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = int(n), in = int(m), ik = int(k), ilda = int(ldb), ildb = int(lda), ildc = int(ldc);
  if constexpr (std::is_same_v<A, float>) sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  else dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
#else
  using at::native::TransposeType;
  at::native::cpublas::gemm_stub(at::kCPU, c10::CppTypeToScalarType<A>::value,
                                 trans_b ? TransposeType::Transpose : TransposeType::NoTranspose,
                                 trans_a ? TransposeType::Transpose : TransposeType::NoTranspose, n, m, k, alpha, b,
                                 ldb, a, lda, beta, c, ldc);
#endif
}

// Inside a task BLAS runs on the calling thread only: the tasks are the
// parallelism, and a task's sums must not depend on how many threads BLAS
// would split them over (at::parallel_for runs a lone task on the caller,
// outside any parallel region, where MKL would otherwise go wide).
struct SingleThreadBlas {
#if AT_MKL_ENABLED()
  int previous = MKL_Set_Num_Threads_Local(1);
  ~SingleThreadBlas() { MKL_Set_Num_Threads_Local(previous); }
#endif
};

// The dropout of csrc/common/philox.h for one (batch, q head).
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t offset = 0, threshold = 0;
  double keep_scale = 1;  // 1 / (1 - dropout_p)

  // Calls f(j, kept) for columns col0 .. col0 + n - 1 of score row `row`.
  template <typename F>
  void for_each(uint32_t bh, int64_t row, int64_t col0, int64_t n, const F& f) const {
    for (int64_t j = 0; j < n;) {
      const int64_t col = col0 + j;
      const Philox4 r = dropout_bits4(seed, offset, bh, uint32_t(row), uint32_t(col >> 2));
      const uint32_t words[4] = {r.x, r.y, r.z, r.w};
      for (int64_t w = col & 3; w < 4 && j < n; ++w, ++j) f(j, dropout_keep(words[w], threshold));
    }
  }
};

Dropout make_dropout(double dropout_p, int64_t seed, int64_t offset) {
  Dropout d;
  d.on = dropout_p > 0;
  d.seed = uint64_t(seed);
  d.offset = uint32_t(uint64_t(offset));
  d.threshold = uint32_t(std::floor(dropout_p * 4294967296.0));
  d.keep_scale = 1.0 / (1.0 - dropout_p);
  return d;
}

// Everything a kernel needs besides the tensors' data.
struct Problem {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, dim;
  bool causal;
  double scale;
  Dropout dropout;
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_q = 0;
  int64_t group() const { return q_heads / kv_heads; }
  // Keys [0, kv_end) are visible to some query row in [i0, i0 + rows): with
  // top-left causal alignment key j is visible to row i iff j <= i.
  int64_t kv_end(int64_t i0, int64_t rows) const { return causal ? std::min(kv_len, i0 + rows) : kv_len; }
  // Columns [j0, j0 + valid) of a key block are visible to row i.
  int64_t visible(int64_t i, int64_t j0, int64_t cols) const {
    return causal ? std::clamp<int64_t>(i - j0 + 1, 0, cols) : cols;
  }
};

// Rows per query block and keys per key block. Bigger blocks amortize the
// per-GEMM overhead and the per-row softmax bookkeeping, but the score
// blocks (q x kv fp32, three of them in the backward) should stay in L2, and
// the causal diagonal wastes about q^2 / 2 scores per query block. Measured
// on 2 AVX-512 Xeon cores (B=4, H=12, D=64, T=512..2048, fp32): forward times
// were flat within noise from 64 x 256 to 256 x 1024; the backward was best
// at 64 x 128.
struct Blocks {
  int64_t q, kv;
};
Blocks forward_blocks(const Problem& p) {
  const int64_t q = p.q_len >= 192 ? 128 : 32;
  return {std::max<int64_t>(1, std::min(q, p.q_len)), std::max<int64_t>(1, std::min<int64_t>(512, p.kv_len))};
}
Blocks backward_blocks(const Problem& p) {
  return {std::max<int64_t>(1, std::min<int64_t>(64, p.q_len)),
          std::max<int64_t>(1, std::min<int64_t>(128, p.kv_len))};
}

// n rows of `dim` values of T as opmath A: the data itself when T is A, else
// converted into buf.
template <typename T, typename A>
const A* as_opmath(const T* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t e = 0; e < n; ++e) buf[e] = A(src[e]);
    return buf;
  }
}

template <typename A>
A* data(const at::Tensor& t) {
  return static_cast<A*>(t.data_ptr());
}

template <typename T>
void attention_forward_kernel(const Problem& p, const T* q, const T* k, const T* v,
                              const at::opmath_type<T>* mask, T* out, at::opmath_type<T>* lse) {
  using A = at::opmath_type<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const SoftmaxRowKernels<A>& rows = softmax_row_kernels<A>();
  const Blocks blk = forward_blocks(p);
  const int64_t D = p.dim, q_blocks = (p.q_len + blk.q - 1) / blk.q;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);

  at::parallel_for(0, p.batch * p.q_heads * q_blocks, 1, [&](int64_t t0, int64_t t1) {
    SingleThreadBlas single_thread_blas;
    // Per-thread buffers from ATen's allocator: 64-byte aligned, so MKL sees
    // the same alignment, hence sums in the same order, on every run.
    auto scores_t = at::empty({blk.q * blk.kv}, opts), acc_t = at::empty({blk.q * D}, opts);
    auto convert_t = at::empty({kConvert ? blk.q * D + 2 * blk.kv * D : 0}, opts);
    A* scores = data<A>(scores_t);
    A* acc = data<A>(acc_t);
    A* q_buf = data<A>(convert_t);
    A* k_buf = q_buf + blk.q * D;
    A* v_buf = k_buf + blk.kv * D;
    std::vector<OnlineSoftmax<A>> state(blk.q);

    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / q_blocks, b = bh / p.q_heads, h = bh % p.q_heads;
      const int64_t i0 = (task % q_blocks) * blk.q, nq = std::min(blk.q, p.q_len - i0);
      const int64_t kv_head = b * p.kv_heads + h / p.group();
      const A* q_rows = as_opmath(q + (bh * p.q_len + i0) * D, nq * D, q_buf);
      const T* k_head = k + kv_head * p.kv_len * D;
      const T* v_head = v + kv_head * p.kv_len * D;
      const A* mask_rows = mask ? mask + b * p.mask_stride_b + h * p.mask_stride_h + i0 * p.mask_stride_q : nullptr;

      std::fill(acc, acc + nq * D, A(0));
      std::fill(state.begin(), state.begin() + nq, online_softmax_init<A>());
      const int64_t kv_end = p.kv_end(i0, nq);
      for (int64_t j0 = 0; j0 < kv_end; j0 += blk.kv) {
        const int64_t nk = std::min(blk.kv, kv_end - j0);
        const A* k_rows = as_opmath(k_head + j0 * D, nk * D, k_buf);
        const A* v_rows = as_opmath(v_head + j0 * D, nk * D, v_buf);
        gemm<A>(false, true, nq, nk, D, A(p.scale), q_rows, D, k_rows, D, A(0), scores, nk);
        for (int64_t r = 0; r < nq; ++r) {
          A* s = scores + r * nk;
          const int64_t valid = p.visible(i0 + r, j0, nk);
          const A* m = mask_rows ? mask_rows + r * p.mask_stride_q + j0 : nullptr;
          const A block_max = rows.scale_mask_max(s, m, A(1), s, valid);
          const A factor = online_softmax_raise_max(state[r], block_max);
          online_softmax_add(state[r], rows.exp_sum(s, online_softmax_safe_max(state[r].max), s, valid));
          std::fill(s + valid, s + nk, A(0));
          // lse and the row sum are of the undropped p; only P V sees the mask.
          if (p.dropout.on) {
            const A keep_scale = A(p.dropout.keep_scale);
            p.dropout.for_each(uint32_t(bh), i0 + r, j0, valid,
                               [&](int64_t j, bool kept) { s[j] = kept ? s[j] * keep_scale : A(0); });
          }
          if (factor != A(1)) rows.scale(acc + r * D, factor, D);
        }
        gemm<A>(false, false, nq, D, nk, A(1), scores, nk, v_rows, D, A(1), acc, D);
      }
      T* out_rows = out + (bh * p.q_len + i0) * D;
      for (int64_t r = 0; r < nq; ++r) {
        const A inv = online_softmax_inv_sum(state[r]);
        const A* a = acc + r * D;
        for (int64_t d = 0; d < D; ++d) out_rows[r * D + d] = T(a[d] * inv);
        lse[bh * p.q_len + i0 + r] = online_softmax_lse(state[r]);
      }
    }
  });
}

template <typename T>
void attention_backward_kernel(const Problem& p, const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                               const at::opmath_type<T>* lse, const at::opmath_type<T>* mask, T* grad_q, T* grad_k,
                               T* grad_v) {
  using A = at::opmath_type<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const SoftmaxRowKernels<A>& rows = softmax_row_kernels<A>();
  const Blocks blk = backward_blocks(p);
  const int64_t D = p.dim, Tk = p.kv_len;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);

  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    SingleThreadBlas single_thread_blas;
    const int64_t sq = blk.q * blk.kv;
    auto scores_t = at::empty({(p.dropout.on ? 3 : 2) * sq}, opts);
    A* probs = data<A>(scores_t);        // P, recomputed
    A* grad_scores = probs + sq;               // dP, then dS in place
    A* dropped = p.dropout.on ? probs + 2 * sq : probs;  // P with dropout: what V saw
    auto row_t = at::empty({2 * blk.q + D}, opts);
    A* row_lse = data<A>(row_t);
    A* row_delta = row_lse + blk.q;  // D_i = dO_i . O_i
    A* out_row = row_delta + blk.q;
    // Converted inputs and fp32 accumulators (kConvert), else the tensors.
    auto head_t = at::empty({kConvert ? 4 * Tk * D : 0}, opts);
    auto block_t = at::empty({(kConvert ? 3 : 1) * blk.q * D}, opts);
    A* dq_acc = data<A>(block_t);
    A* q_buf = dq_acc + blk.q * D;
    A* do_buf = q_buf + blk.q * D;

    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / p.kv_heads, kv_head = task % p.kv_heads;
      const int64_t head_off = task * Tk * D;
      A* k_head = nullptr;
      A* v_head = nullptr;
      A* dk = nullptr;
      A* dv = nullptr;
      if constexpr (kConvert) {
        A* base = data<A>(head_t);
        k_head = const_cast<A*>(as_opmath(k + head_off, Tk * D, base));
        v_head = const_cast<A*>(as_opmath(v + head_off, Tk * D, base + Tk * D));
        dk = base + 2 * Tk * D;
        dv = base + 3 * Tk * D;
      } else {
        k_head = const_cast<A*>(k + head_off);
        v_head = const_cast<A*>(v + head_off);
        dk = grad_k + head_off;
        dv = grad_v + head_off;
      }
      std::fill(dk, dk + Tk * D, A(0));
      std::fill(dv, dv + Tk * D, A(0));

      // The group's q heads in order, each adding into the same dK, dV.
      for (int64_t g = 0; g < p.group(); ++g) {
        const int64_t h = kv_head * p.group() + g, bh = b * p.q_heads + h;
        for (int64_t i0 = 0; i0 < p.q_len; i0 += blk.q) {
          const int64_t nq = std::min(blk.q, p.q_len - i0), row0 = bh * p.q_len + i0;
          const A* q_rows = as_opmath(q + row0 * D, nq * D, q_buf);
          const A* do_rows = as_opmath(grad_out + row0 * D, nq * D, do_buf);
          A* dq = dq_acc;
          if constexpr (!kConvert) dq = grad_q + row0 * D;
          std::fill(dq, dq + nq * D, A(0));
          for (int64_t r = 0; r < nq; ++r) {
            row_lse[r] = lse[row0 + r];
            row_delta[r] = rows.dot(do_rows + r * D, as_opmath(out + (row0 + r) * D, D, out_row), D);
          }
          const A* mask_rows =
              mask ? mask + b * p.mask_stride_b + h * p.mask_stride_h + i0 * p.mask_stride_q : nullptr;

          const int64_t kv_end = p.kv_end(i0, nq);
          for (int64_t j0 = 0; j0 < kv_end; j0 += blk.kv) {
            const int64_t nk = std::min(blk.kv, kv_end - j0);
            const A* k_rows = k_head + j0 * D;
            const A* v_rows = v_head + j0 * D;
            gemm<A>(false, true, nq, nk, D, A(p.scale), q_rows, D, k_rows, D, A(0), probs, nk);
            gemm<A>(false, true, nq, nk, D, A(1), do_rows, D, v_rows, D, A(0), grad_scores, nk);
            for (int64_t r = 0; r < nq; ++r) {
              A* pr = probs + r * nk;
              const int64_t valid = p.visible(i0 + r, j0, nk);
              const A* m = mask_rows ? mask_rows + r * p.mask_stride_q + j0 : nullptr;
              if (m) rows.scale_mask_max(pr, m, A(1), pr, valid);  // adds the mask; the max is not needed
              rows.exp_sum(pr, row_lse[r], pr, valid);  // exp(s - (+inf)) = 0 in fully masked rows
              std::fill(pr + valid, pr + nk, A(0));
              A* gs = grad_scores + r * nk;
              if (p.dropout.on) {
                // dP of the undropped p is dP of the dropped one times the same factor.
                A* dr = dropped + r * nk;
                const A keep_scale = A(p.dropout.keep_scale);
                p.dropout.for_each(uint32_t(bh), i0 + r, j0, valid, [&](int64_t j, bool kept) {
                  const A z = kept ? keep_scale : A(0);
                  dr[j] = pr[j] * z;
                  gs[j] *= z;
                });
                std::fill(dr + valid, dr + nk, A(0));
              }
              rows.softmax_grad(pr, gs, row_delta[r], A(1), gs, nk);  // dS; 0 where p is
            }
            gemm<A>(true, false, nk, D, nq, A(1), dropped, nk, do_rows, D, A(1), dv + j0 * D, D);
            gemm<A>(false, false, nq, D, nk, A(p.scale), grad_scores, nk, k_rows, D, A(1), dq, D);
            gemm<A>(true, false, nk, D, nq, A(p.scale), grad_scores, nk, q_rows, D, A(1), dk + j0 * D, D);
          }
          if constexpr (kConvert) {
            T* gq = grad_q + row0 * D;
            for (int64_t e = 0; e < nq * D; ++e) gq[e] = T(dq[e]);
          }
        }
      }
      if constexpr (kConvert) {
        for (int64_t e = 0; e < Tk * D; ++e) {
          grad_k[head_off + e] = T(dk[e]);
          grad_v[head_off + e] = T(dv[e]);
        }
      }
    }
  });
}

// The checks of the contract, naming what came and what was expected.
Problem check_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, bool is_causal, double scale, double dropout_p,
                      int64_t seed, int64_t offset) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, Hq, Tq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hk, Tk, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, Hk, Tk, D), got shape ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype, op, ": k dtype ", k.scalar_type(), " must match q dtype ", dtype);
  TORCH_CHECK(v.scalar_type() == dtype, op, ": v dtype ", v.scalar_type(), " must match q dtype ", dtype);
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              ": q, k, v must be CPU tensors, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.is_contiguous(), op, ": q must be contiguous, got strides ", q.strides());
  TORCH_CHECK(k.is_contiguous(), op, ": k must be contiguous, got strides ", k.strides());
  TORCH_CHECK(v.is_contiguous(), op, ": v must be contiguous, got strides ", v.strides());
  Problem p;
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.q_len = q.size(2);
  p.dim = q.size(3);
  p.kv_heads = k.size(1);
  p.kv_len = k.size(2);
  TORCH_CHECK(k.size(0) == p.batch && k.size(3) == p.dim, op, ": k must be (B, Hk, Tk, D) = (", p.batch,
              ", Hk, Tk, ", p.dim, ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(p.dim > 0, op, ": head dim D must be positive, got ", p.dim);
  TORCH_CHECK(p.kv_heads > 0 && p.q_heads % p.kv_heads == 0, op, ": q heads (", p.q_heads,
              ") must be a multiple of k/v heads (", p.kv_heads, ")");
  TORCH_CHECK(p.dim <= std::numeric_limits<int>::max() / 1024, op, ": head dim ", p.dim, " is too large");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  p.causal = is_causal;
  p.scale = scale;
  p.dropout = make_dropout(dropout_p, seed, offset);
  if (mask) {
    const auto mask_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(mask->scalar_type() == mask_dtype, op, ": mask must be ", mask_dtype, " for ", dtype, " q, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->device().is_cpu(), op, ": mask must be a CPU tensor, got ", mask->device());
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == p.batch && mask->size(1) == p.q_heads &&
                    mask->size(2) == p.q_len && mask->size(3) == p.kv_len,
                op, ": mask must have shape (B, Hq, Tq, Tk) = (", p.batch, ", ", p.q_heads, ", ", p.q_len, ", ",
                p.kv_len, ") (expanded, strides may be 0), got ", mask->sizes());
    TORCH_CHECK(mask->stride(3) == 1 || p.kv_len <= 1, op, ": mask must have stride 1 in its last dim, got strides ",
                mask->strides());
    p.mask_stride_b = mask->stride(0);
    p.mask_stride_h = mask->stride(1);
    p.mask_stride_q = mask->stride(2);
  }
  return p;
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " must be ",
              like.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), op, ": ", name,
              " must be a contiguous CPU tensor, got strides ", t.strides(), " on ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask, bool is_causal,
                                                     double scale, double dropout_p, int64_t seed, int64_t offset) {
  const Problem p = check_problem("attention_fwd_cpu", q, k, v, mask, is_causal, scale, dropout_p, seed, offset);
  auto out = at::empty_like(q);
  auto lse = at::empty({p.batch, p.q_heads, p.q_len}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    attention_forward_kernel<scalar_t>(p, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                       mask ? mask->data_ptr<A>() : nullptr, out.data_ptr<scalar_t>(),
                                       data<A>(lse));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal, double scale, double dropout_p,
    int64_t seed, int64_t offset) {
  const char* op = "attention_bwd_cpu";
  const Problem p = check_problem(op, q, k, v, mask, is_causal, scale, dropout_p, seed, offset);
  check_like(op, "grad_out", grad_out, q);
  check_like(op, "out", out, q);
  const auto lse_dtype = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.q_heads && lse.size(2) == p.q_len &&
                  lse.is_contiguous() && lse.scalar_type() == lse_dtype,
              op, ": lse must be a contiguous ", lse_dtype, " tensor of shape (", p.batch, ", ", p.q_heads, ", ",
              p.q_len, "), got ", lse.scalar_type(), " ", lse.sizes());
  auto grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    attention_backward_kernel<scalar_t>(p, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                        k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        data<A>(lse), mask ? mask->data_ptr<A>() : nullptr,
                                        grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                        grad_v.data_ptr<scalar_t>());
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace fasttx
