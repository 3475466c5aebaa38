// scaled_dot_product_attention on CUDA: cuBLAS batched GEMMs around the fused
// scaled-masked softmax of softmax.cuh (the contract is attention_fwd_cpu /
// attention_bwd_cpu in csrc/ops.h). The (B, Hq, Tq, Tk) scores are
// materialized; this is the exact, simple path, not a flash kernel.
//
// Grouped-query attention without copying k/v: with G = Hq / Hk, q
// (B, Hq, Tq, D) contiguous is the batch (B * Hk, G * Tq, D) of G query heads
// per kv head, so
//   S' = scale * Q' K^T          (B*Hk, G*Tq, Tk)   one batched GEMM
//   out' = P' V                  (B*Hk, G*Tq, D)
//   dK = scale * dS'^T Q',  dV = P'^T dO'           the sum over the group is
//                                                   the GEMM's own reduction
// and row r of S' is row r = (b * Hq + h) * Tq + i of the (B, Hq, Tq, Tk)
// scores: the softmax kernels see plain rows.
//
// Forward: S' in fp32 (for fp16/bf16 the GEMM accumulates and stores fp32, so
// scores are not rounded to 16 bits before the softmax; fp64 inputs keep
// fp64 scores, lse and mask throughout), then the softmax
// kernel adds the mask, applies causality, writes lse and the dropped,
// rescaled probabilities P in the input dtype, and out' = P' V.
// Backward (nothing but lse is kept): S' again (the same GEMM, bitwise the
// forward's), dP' = dO' V^T in fp32 (fp64), then one row kernel per (b, h, i):
//   Delta_i = sum_d dO_id O_id              (the row's warp, before the row)
//   P_ij = exp(s_ij - lse_i)                (0 for a masked score, and for a
//                                            fully masked row where lse = +inf)
//   Pd_ij = keep_ij P_ij / (1 - p),  dS_ij = P_ij (keep_ij dP_ij / (1 - p) - Delta_i)
// with keep regenerated from Philox; then dV = Pd'^T dO', dQ' = scale dS' K,
// dK = scale dS'^T Q'. For fp32 and fp64, P overwrites S and dS overwrites dP
// in place (each element is read, then written, by one thread).
// No atomics; the GEMMs are cuBLAS's, bitwise reproducible for fixed shapes
// on one GPU and cuBLAS version: the backward is deterministic.
#include "ops.h"
#include "cuda/softmax.cuh"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fasttx {
namespace {

#define FASTTX_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

// Packs of the backward row kernel: 4 columns of S and dP (16 bytes of fp32,
// 32 of fp64), one Philox group.
constexpr int kBwdVec = 4;
// Packs per lane loaded back to back (loads in flight): 4, or 2 with fp64
// math, whose libdevice exp needs the registers.
template <typename A>
constexpr int bwd_batch() {
  return sizeof(A) == 4 ? 4 : 2;
}

template <typename T>
struct AttentionBwdArgs {
  using A = acc_t<T>;
  const A* s;          // (rows, tk) scale * q k^T, no mask; may alias pd when T = A
  const A* dp;         // (rows, tk) dO v^T (before the dropout mask); may alias ds when T = A
  const A* lse;        // (rows,)
  const T* grad_out;   // (rows, d)
  const T* out;        // (rows, d)
  MaskView<A> mask;
  T* pd;               // (rows, tk) out: dropped, rescaled probabilities
  T* ds;               // (rows, tk) out: score gradients (without the scale)
  int64_t rows, tq, heads;
  int tk, d;
  bool d_vectorized;   // grad_out and out rows move in 16-byte packs
  DropoutParams dropout;
};

// Delta of one row: sum_d grad_out[d] * out[d] in A, every lane gets it.
template <typename A, typename T>
__device__ __forceinline__ A row_delta(const T* go, const T* o, int d, bool vectorized, int lane) {
  A acc = A(0);
  if (vectorized) {
    constexpr int V = 16 / sizeof(T);
    for (int c = lane * V; c < d; c += kSoftmaxWarp * V) {
      const Pack<T, V> a = load<T, V>(go + c), b = load<T, V>(o + c);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += static_cast<A>(a.v[k]) * static_cast<A>(b.v[k]);
    }
  } else {
    for (int c = lane; c < d; c += kSoftmaxWarp) acc += static_cast<A>(go[c]) * static_cast<A>(o[c]);
  }
  return warp_sum(acc);
}

// One warp per score row (the layout of softmax_fwd_kernel): reads the row of
// S and dP once, writes the rows of Pd and dS once. Causal rows stop at the
// diagonal and write zeros past it without reading.
// 2 blocks per SM (<= 128 registers) with fp32 math; fp64 math needs more.
template <typename T, bool CAUSAL, bool ALIGNED>
__global__ void __launch_bounds__(kSoftmaxThreads, (sizeof(acc_t<T>) == 4 ? 2 : 1))
    attention_bwd_rows_kernel(const AttentionBwdArgs<T> a) {
  using A = acc_t<T>;
  constexpr int VEC = kBwdVec;
  constexpr int BATCH = bwd_batch<A>();
  const int lane = threadIdx.x % kSoftmaxWarp;
  const int total_packs = (a.tk + VEC - 1) / VEC;
  const int64_t row_step = int64_t(gridDim.x) * kSoftmaxWarps;
  for (int64_t row = int64_t(blockIdx.x) * kSoftmaxWarps + threadIdx.x / kSoftmaxWarp; row < a.rows;
       row += row_step) {
    const RowGeometry g = row_geometry<CAUSAL>(row, a.tq, a.heads, a.tk, a.mask);
    const A delta = row_delta<A>(a.grad_out + row * a.d, a.out + row * a.d, a.d, a.d_vectorized, lane);
    const A lse = a.lse[row];
    // lse = +inf: a fully masked row, all of whose probabilities and gradients are 0.
    const int valid_packs = lse == A(INFINITY) ? 0 : (g.n_cols + VEC - 1) / VEC;
    const A* srow = a.s + row * a.tk;
    const A* dprow = a.dp + row * a.tk;
    const A* mrow = a.mask.ptr != nullptr ? a.mask.ptr + g.mask_off : nullptr;
    T* pdrow = a.pd + row * a.tk;
    T* dsrow = a.ds + row * a.tk;
#pragma unroll 1
    for (int p0 = lane; p0 < total_packs; p0 += BATCH * kSoftmaxWarp) {
      A s[BATCH][VEC], dp[BATCH][VEC];
#pragma unroll
      for (int t = 0; t < BATCH; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < valid_packs) {
          load_scores<VEC, ALIGNED>(srow, mrow, p * VEC, g.n_cols, A(1), s[t]);
          load_pack<VEC, ALIGNED>(dprow, p * VEC, g.n_cols, dp[t]);
        }
      }
#pragma unroll
      for (int t = 0; t < BATCH; ++t) {
        const int p = p0 + t * kSoftmaxWarp;
        if (p < valid_packs) {
          const int col0 = p * VEC;
          // keep / (1 - p) per column, the forward's mask regenerated (1 without dropout).
          A keep[VEC];
          if (a.dropout.enabled) {
            dropout_factors(keep, a.dropout, g.bh, g.i, col0);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) keep[k] = A(1);
          }
          A pd[VEC];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A prob = fast_exp(s[t][k] - lse);  // s = -inf (masked, or past the diagonal): 0
            pd[k] = keep[k] != A(0) ? prob * keep[k] : A(0);
            // Columns past n_cols are zero outright, whatever dP holds there.
            const A dprob = keep[k] != A(0) ? dp[t][k] * keep[k] : A(0);
            dp[t][k] = col0 + k < g.n_cols ? prob * (dprob - delta) : A(0);
          }
          store_pack<VEC, ALIGNED>(pdrow, col0, a.tk, pd);
          store_pack<VEC, ALIGNED>(dsrow, col0, a.tk, dp[t]);
        } else if (p < total_packs) {
          store_zeros<VEC, ALIGNED>(pdrow, p * VEC, a.tk);
          store_zeros<VEC, ALIGNED>(dsrow, p * VEC, a.tk);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Shapes of one call, checked.
struct Shapes {
  int64_t b, hq, hk, tq, tk, d;
};

void check_same(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device() == q.device(), fn, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), fn, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, fn, ": ", name, " must have sizes ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ", t.strides(), " for sizes ",
              t.sizes());
}

Shapes check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), fn, ": q must be a CUDA tensor, got ", q.device());
  const auto type = q.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble, fn,
              ": q must be float32, float16, bfloat16 or float64, got ", type);
  TORCH_CHECK(q.dim() == 4, fn, ": q must be a 4-D (B, Hq, Tq, D) tensor, got sizes ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), fn, ": q must be contiguous, got strides ", q.strides(), " for sizes ", q.sizes());
  TORCH_CHECK(k.dim() == 4, fn, ": k must be a 4-D (B, Hk, Tk, D) tensor, got sizes ", k.sizes());
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  check_same(fn, "k", k, q, {s.b, s.hk, s.tk, s.d});
  check_same(fn, "v", v, q, {s.b, s.hk, s.tk, s.d});
  TORCH_CHECK(s.hk >= 1 && s.hq % s.hk == 0, fn, ": q's head count Hq must be a multiple of k's Hk >= 1, got Hq = ",
              s.hq, " and Hk = ", s.hk);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(s.tk <= kIntMax && s.d <= kIntMax, fn, ": Tk and D must be at most 2^31 - 1, got Tk = ", s.tk,
              " and D = ", s.d);
  return s;
}

// The dtype of scores, lse and the mask: fp32, or fp64 for fp64 inputs.
at::ScalarType math_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_dropout(const char* fn, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// torch refuses fp16 x fp16 -> fp32 GEMMs while fp16 accumulation is allowed
// for cuBLAS (torch.backends.cuda.matmul.allow_fp16_accumulation).
bool half_gemm_narrow_only(const at::Tensor& a) {
  return a.scalar_type() == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS();
}

// S' (B*Hk, G*Tq, Tk) in the math type (fp32; fp64 for fp64) = scale * Q' K^T:
// the forward's and the backward's identical call. fp16/bf16 inputs accumulate
// and store fp32 in the GEMM; where torch forbids fp32 output
// (half_gemm_narrow_only) the GEMM writes fp16 and the scores are widened.
void scores_gemm(at::Tensor& s3, const at::Tensor& q3, const at::Tensor& k3, double scale) {
  if (q3.size(2) == 0) {  // D = 0: every dot product is 0
    s3.zero_();
    return;
  }
  const at::Tensor kt = k3.transpose(1, 2);
  if (q3.scalar_type() == s3.scalar_type()) {  // fp32, fp64
    at::baddbmm_out(s3, s3, q3, kt, /*beta=*/0, /*alpha=*/scale);
  } else if (!half_gemm_narrow_only(q3)) {
    at::baddbmm_out(s3, s3, q3, kt, at::kFloat, /*beta=*/0, /*alpha=*/scale);
  } else {
    auto narrow = at::empty(s3.sizes(), q3.options());
    at::baddbmm_out(narrow, narrow, q3, kt, /*beta=*/0, /*alpha=*/scale);
    s3.copy_(narrow);
  }
}

// dP' (B*Hk, G*Tq, Tk) in the math type = dO' V^T, as scores_gemm.
void grad_probs_gemm(at::Tensor& dp3, const at::Tensor& do3, const at::Tensor& v3) {
  if (do3.size(2) == 0) {
    dp3.zero_();
    return;
  }
  const at::Tensor vt = v3.transpose(1, 2);
  if (do3.scalar_type() == dp3.scalar_type()) {  // fp32, fp64
    at::bmm_out(dp3, do3, vt);
  } else if (!half_gemm_narrow_only(do3)) {
    at::bmm_out(dp3, do3, vt, at::kFloat);
  } else {
    dp3.copy_(at::bmm(do3, vt));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& mask, bool is_causal,
                                                      double scale, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* fn = "attention_fwd_cuda";
  const Shapes sh = check_qkv(fn, q, k, v);
  const MaskInfo mask_info = check_mask(fn, mask, q, sh.b, sh.hq, sh.tq, sh.tk);
  check_dropout(fn, dropout_p);

  const c10::cuda::CUDAGuard guard(q.device());
  const at::NoGradGuard no_grad;  // the out= GEMMs below are internal, never differentiated
  const auto acc = math_dtype(q);
  auto out = at::empty_like(q);
  auto lse = at::empty({sh.b, sh.hq, sh.tq}, q.options().dtype(acc));
  const int64_t rows = sh.b * sh.hq * sh.tq;
  if (rows == 0) return {out, lse};

  const int64_t g = sh.hq / sh.hk, bk = sh.b * sh.hk;
  const at::Tensor q3 = q.view({bk, g * sh.tq, sh.d});
  const at::Tensor k3 = k.view({bk, sh.tk, sh.d});
  const at::Tensor v3 = v.view({bk, sh.tk, sh.d});
  at::Tensor s3 = at::empty({bk, g * sh.tq, sh.tk}, q.options().dtype(acc));
  scores_gemm(s3, q3, k3, scale);
  at::Tensor p3 = q.scalar_type() == acc ? s3 : at::empty(s3.sizes(), q.options());  // in place for fp32/fp64

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTTX_DISPATCH_ATTENTION_TYPES(q.scalar_type(), fn, [&] {
    using A = acc_t<scalar_t>;
    SoftmaxFwdArgs<A, scalar_t> a{};
    a.x = s3.const_data_ptr<A>();
    a.y = p3.mutable_data_ptr<scalar_t>();
    a.lse = lse.mutable_data_ptr<A>();
    a.mask = typed_mask<A>(mask_info);
    a.rows = rows;
    a.tq = sh.tq;
    a.heads = sh.hq;
    a.tk = static_cast<int>(sh.tk);
    a.scale = A(1);  // the GEMM applied it
    a.dropout = make_dropout(dropout_p, seed, offset);
    launch_softmax_fwd(a, is_causal, stream);
  });

  at::Tensor out3 = out.view({bk, g * sh.tq, sh.d});
  if (sh.tk == 0) {
    out.zero_();  // no keys: every row is fully masked
  } else if (sh.d > 0) {
    at::bmm_out(out3, p3, v3);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal, double scale, double dropout_p,
    int64_t seed, int64_t offset) {
  constexpr const char* fn = "attention_bwd_cuda";
  const Shapes sh = check_qkv(fn, q, k, v);
  check_same(fn, "grad_out", grad_out, q, q.sizes());
  check_same(fn, "out", out, q, q.sizes());
  TORCH_CHECK(lse.device() == q.device(), fn, ": lse must be on q's device ", q.device(), ", got ", lse.device());
  TORCH_CHECK(lse.scalar_type() == math_dtype(q), fn, ": lse must be ", math_dtype(q), " for ", q.scalar_type(),
              " q, got ", lse.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({sh.b, sh.hq, sh.tq}) && lse.is_contiguous(), fn,
              ": lse must be contiguous of sizes (B, Hq, Tq) = ", at::IntArrayRef({sh.b, sh.hq, sh.tq}),
              ", got sizes ", lse.sizes(), " and strides ", lse.strides());
  const MaskInfo mask_info = check_mask(fn, mask, q, sh.b, sh.hq, sh.tq, sh.tk);
  check_dropout(fn, dropout_p);

  const c10::cuda::CUDAGuard guard(q.device());
  const at::NoGradGuard no_grad;
  const auto acc = math_dtype(q);
  auto grad_q = at::empty_like(q);
  auto grad_k = at::empty_like(k);
  auto grad_v = at::empty_like(v);
  const int64_t rows = sh.b * sh.hq * sh.tq;
  if (rows == 0 || sh.tk == 0 || sh.d == 0) {
    // No queries, no keys or empty heads: nothing flows, every gradient is 0.
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }

  const int64_t g = sh.hq / sh.hk, bk = sh.b * sh.hk;
  const at::Tensor q3 = q.view({bk, g * sh.tq, sh.d});
  const at::Tensor k3 = k.view({bk, sh.tk, sh.d});
  const at::Tensor v3 = v.view({bk, sh.tk, sh.d});
  const at::Tensor do3 = grad_out.view({bk, g * sh.tq, sh.d});
  at::Tensor s3 = at::empty({bk, g * sh.tq, sh.tk}, q.options().dtype(acc));
  scores_gemm(s3, q3, k3, scale);
  at::Tensor dp3 = at::empty({bk, g * sh.tq, sh.tk}, q.options().dtype(acc));
  grad_probs_gemm(dp3, do3, v3);
  const bool in_place = q.scalar_type() == acc;  // fp32, fp64
  at::Tensor pd3 = in_place ? s3 : at::empty(s3.sizes(), q.options());
  at::Tensor ds3 = in_place ? dp3 : at::empty(s3.sizes(), q.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTTX_DISPATCH_ATTENTION_TYPES(q.scalar_type(), fn, [&] {
    using A = acc_t<scalar_t>;
    AttentionBwdArgs<scalar_t> a{};
    a.s = s3.const_data_ptr<A>();
    a.dp = dp3.const_data_ptr<A>();
    a.lse = lse.const_data_ptr<A>();
    a.grad_out = grad_out.const_data_ptr<scalar_t>();
    a.out = out.const_data_ptr<scalar_t>();
    a.mask = typed_mask<A>(mask_info);
    a.pd = pd3.mutable_data_ptr<scalar_t>();
    a.ds = ds3.mutable_data_ptr<scalar_t>();
    a.rows = rows;
    a.tq = sh.tq;
    a.heads = sh.hq;
    a.tk = static_cast<int>(sh.tk);
    a.d = static_cast<int>(sh.d);
    constexpr int kDVec = 16 / sizeof(scalar_t);
    a.d_vectorized = sh.d % kDVec == 0 && softmax_aligned16(a.grad_out) && softmax_aligned16(a.out);
    a.dropout = make_dropout(dropout_p, seed, offset);
    const bool aligned = sh.tk % kBwdVec == 0 && softmax_aligned16(a.s) && softmax_aligned16(a.dp) &&
                         softmax_aligned16(a.pd) && softmax_aligned16(a.ds) && mask_aligned16(a.mask);
    const int blocks = softmax_blocks(rows);
    if (is_causal && aligned) {
      attention_bwd_rows_kernel<scalar_t, true, true><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
    } else if (is_causal) {
      attention_bwd_rows_kernel<scalar_t, true, false><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
    } else if (aligned) {
      attention_bwd_rows_kernel<scalar_t, false, true><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
    } else {
      attention_bwd_rows_kernel<scalar_t, false, false><<<blocks, kSoftmaxThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  at::Tensor dq3 = grad_q.view({bk, g * sh.tq, sh.d});
  at::Tensor dk3 = grad_k.view({bk, sh.tk, sh.d});
  at::Tensor dv3 = grad_v.view({bk, sh.tk, sh.d});
  at::bmm_out(dv3, pd3.transpose(1, 2), do3);                                   // dV = Pd'^T dO'
  at::baddbmm_out(dq3, dq3, ds3, k3, /*beta=*/0, /*alpha=*/scale);              // dQ' = scale dS' K
  at::baddbmm_out(dk3, dk3, ds3.transpose(1, 2), q3, /*beta=*/0, /*alpha=*/scale);  // dK = scale dS'^T Q'
  return {grad_q, grad_k, grad_v};
}

}  // namespace fasttx
