// Cross-entropy over the rows of logits (N, V) on CUDA, forward and backward;
// the contract is cross_entropy_fwd_cpu / cross_entropy_bwd_cpu in csrc/ops.h:
//   forward:  m = max(x_n), log_sum = log(sum exp(x_n - m)) and
//             loss = (m - x_n[target_n]) + log_sum, each fp32 (N,), loss 0 for a
//             row whose target is ignore_index. Never lse - x_n[target_n]:
//             lse = m + log_sum rounds log_sum away at a large shared offset
//             (an fp32 ulp is 8 at 1e8), where m - x_n[target_n] cancels it;
//   backward: grad_x = grad_rows[n] * (softmax(x_n) - onehot(target_n)) in
//             logits' dtype, softmax = exp((x - m) - log_sum) from the
//             forward's m and log_sum; 0 for an ignored row (NaN where it holds NaN or +inf).
// fp32, fp16 and bf16 logits, all math in fp32 (fp64: the cpu and torch backends).
//
// V is an LM's vocabulary (GPT-2's 50257: 200 KB of fp32 per row), so a row
// belongs to a whole 256-thread block (a grid-stride loop over rows) and never
// sits in registers:
//  - the row is cut where its address crosses 16 bytes: a head of fewer than
//    VEC elements, then whole 16-byte packs of VEC elements (4 fp32, 8 fp16 or
//    bf16) moved by one LDG.128 / STG.128 each, then a tail of fewer than VEC.
//    So every row, at any V and any row start (50257 is odd), reads its body in
//    16-byte loads. Thread k owns packs k, k + 256, ...; it loads kCeBatch of
//    them back to back before using any, to keep loads in flight;
//  - the forward keeps a running max m and a sum s of exp(x - m) per thread
//    (rescaled when m grows: the online logsumexp), reads the row once, and
//    merges the threads' (m, s) in a fixed tree (shfl_down within a warp, then
//    the warps' results in order from shared memory), so lse is bitwise
//    reproducible run to run. log_sum = log(s) in fp64 (once per row);
//  - the backward reads the row once and writes the gradient once. Its 16-byte
//    path needs x and grad_x at the same offset modulo 16 bytes (a fresh
//    grad_x and a freshly allocated x are both 16-byte aligned); otherwise it
//    moves elements one by one.
// exp is __expf (the SFU ex2, a few ulp) of x - m <= 0 ((x - m) - log_sum in
// the backward), so its error does not grow with |x|.
//
// Targets: the Python layer (fasttx.ops.cross_entropy._check) rejects a target
// that is neither ignore_index nor in [0, V); these kernels do not raise. They
// still never read outside the row: such a target (only torch.compile, where
// the Python check is skipped, can pass one) reads nothing and poisons its row,
// loss = NaN in the forward and a NaN gradient row in the backward, as the
// Triton kernels (kernels/cross_entropy.py) do.
#include "ops.h"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fasttx {
namespace {

constexpr int kCeThreads = 256;  // threads per row (one block)
constexpr int kCeWarp = 32;
constexpr int kCeWarps = kCeThreads / kCeWarp;
// Packs per thread loaded back to back (16-byte loads in flight per thread).
constexpr int kCeBatch = 4;
// Grid-stride over rows: more blocks than this buys nothing.
constexpr int64_t kCeMaxBlocks = int64_t(1) << 16;
constexpr unsigned kCeFullMask = 0xffffffffu;

#define FASTTX_DISPATCH_CROSS_ENTROPY_TYPES(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Elements per 16-byte pack.
template <typename T>
constexpr int ce_vec() {
  return int(16 / sizeof(T));
}

__device__ __forceinline__ float ce_nan() { return __int_as_float(0x7fffffff); }

// A thread's (or a group's) share of a row: max m of its values and
// s = sum exp(x - m). Empty, or only -inf seen: (-inf, 0).
struct MaxSum {
  float m, s;
};

// Two shares over one max. Both empty: (-inf, 0), never NaN (__expf(-inf) = 0).
__device__ __forceinline__ MaxSum ce_merge(const MaxSum& a, const MaxSum& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// Folds N values into the running share: the max first (one rescale at most).
// m_safe stands in for m = -inf: exp(-inf - 0) = 0 where exp(-inf - -inf) is NaN.
template <int N>
__device__ __forceinline__ void ce_accumulate(MaxSum& st, const float (&v)[N]) {
  float pm = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) pm = fmaxf(pm, v[k]);
  if (pm > st.m) {
    st.s *= __expf(st.m - pm);  // st.m = -inf: s is 0 and stays 0
    st.m = pm;
  }
  const float m_safe = st.m == -INFINITY ? 0.0f : st.m;
#pragma unroll
  for (int k = 0; k < N; ++k) st.s += __expf(v[k] - m_safe);
}

// The block's shares merged in a fixed tree; every thread gets the result.
// slots has kCeWarps entries.
__device__ __forceinline__ MaxSum ce_block_reduce(MaxSum v, MaxSum* slots) {
#pragma unroll
  for (int d = kCeWarp / 2; d > 0; d /= 2) {
    const MaxSum o{__shfl_down_sync(kCeFullMask, v.m, d), __shfl_down_sync(kCeFullMask, v.s, d)};
    v = ce_merge(v, o);
  }
  __syncthreads();  // the previous row's readers are done with slots
  if (threadIdx.x % kCeWarp == 0) slots[threadIdx.x / kCeWarp] = v;
  __syncthreads();
  v = slots[0];
#pragma unroll
  for (int w = 1; w < kCeWarps; ++w) v = ce_merge(v, slots[w]);
  return v;
}

// Where a row of V elements of T starting at `row` crosses to 16-byte packs:
// `head` elements (< VEC) before the first 16-byte boundary, then `packs`
// whole packs, then the tail (< VEC). `row` is element-aligned, as every
// tensor's data is.
template <typename T>
__device__ __forceinline__ void ce_split(const T* row, int64_t V, int64_t& head, int64_t& packs) {
  const uint32_t mis = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(row) % 16);
  head = mis == 0 ? 0 : std::min<int64_t>((16 - mis) / sizeof(T), V);
  packs = (V - head) / ce_vec<T>();
}

// Stores v to p[0 .. VEC) (16-byte aligned) as T with one STG.128. fp16/bf16
// go as their raw 16-bit patterns: a Pack of c10::Half / c10::BFloat16 would
// be stored element by element.
template <typename T, int VEC>
__device__ __forceinline__ void ce_store_pack(T* p, const float (&v)[VEC]) {
  if constexpr (sizeof(T) == 2) {
    Pack<uint16_t, VEC> bits;
#pragma unroll
    for (int k = 0; k < VEC; ++k) bits.v[k] = static_cast<T>(v[k]).x;
    store<uint16_t, VEC>(reinterpret_cast<uint16_t*>(p), bits);
  } else {
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<T>(v[k]);
    store<T, VEC>(p, out);
  }
}

// Which element of the row's head and tail (together at most 2 (VEC - 1) <
// kCeThreads) thread `tid` owns, or -1.
__device__ __forceinline__ int64_t ce_edge_col(int tid, int64_t head, int64_t body_end, int64_t V) {
  if (tid < head) return tid;
  const int64_t c = body_end + (tid - head);
  return c < V ? c : -1;
}

// ---------------------------------------------------------------------------
// Forward.

template <typename T>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_fwd_kernel(const T* __restrict__ x,
                                                                       const int64_t* __restrict__ target,
                                                                       float* __restrict__ loss,
                                                                       float* __restrict__ row_max,
                                                                       float* __restrict__ log_sum, int64_t rows,
                                                                       int64_t V, int64_t ignore_index) {
  constexpr int VEC = ce_vec<T>();
  static_assert(2 * (VEC - 1) <= kCeThreads, "a row's head and tail are one element per thread");
  __shared__ MaxSum slots[kCeWarps];
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * V;
    int64_t head, packs;
    ce_split(xr, V, head, packs);
    const T* body = xr + head;
    MaxSum st{-INFINITY, 0.0f};

    const int64_t edge = ce_edge_col(tid, head, head + packs * VEC, V);
    if (edge >= 0) {
      const float v[1] = {static_cast<float>(xr[edge])};
      ce_accumulate(st, v);
    }
    // The packs, kCeBatch at a time; the batch's missing packs read as -inf.
#pragma unroll 1
    for (int64_t p0 = tid; p0 < packs; p0 += int64_t(kCeBatch) * kCeThreads) {
      float v[kCeBatch * VEC];
#pragma unroll
      for (int b = 0; b < kCeBatch; ++b) {
        const int64_t p = p0 + int64_t(b) * kCeThreads;
        if (p < packs) {
          const Pack<T, VEC> pk = load<T, VEC>(body + p * VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[b * VEC + k] = static_cast<float>(pk.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[b * VEC + k] = -INFINITY;
        }
      }
      ce_accumulate(st, v);
    }

    st = ce_block_reduce(st, slots);
    if (tid == 0) {
      // A row of -inf: s = 0, log_sum = -inf and its loss NaN, as torch's.
      const float row_log_sum = static_cast<float>(::log(double(st.s)));
      const int64_t t = target[row];
      float row_loss = 0.0f;
      if (t != ignore_index) row_loss = t >= 0 && t < V ? (st.m - static_cast<float>(xr[t])) + row_log_sum : ce_nan();
      row_max[row] = st.m;
      log_sum[row] = row_log_sum;
      loss[row] = row_loss;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward.

// grad_x of one element: (exp((x - m) - log_sum) - [col == t]) * g.
__device__ __forceinline__ float ce_grad(float x, int64_t col, int64_t t, float m, float log_sum, float g) {
  return (__expf((x - m) - log_sum) - (col == t ? 1.0f : 0.0f)) * g;
}

// VECTOR: x and grad_x share their offset modulo 16 bytes, so one split serves both.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kCeThreads) cross_entropy_bwd_kernel(const float* __restrict__ grad_rows,
                                                                       const T* __restrict__ x,
                                                                       const int64_t* __restrict__ target,
                                                                       const float* __restrict__ row_max,
                                                                       const float* __restrict__ log_sum,
                                                                       T* __restrict__ grad_x, int64_t rows,
                                                                       int64_t V, int64_t ignore_index) {
  constexpr int VEC = ce_vec<T>();
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * V;
    T* gr = grad_x + row * V;
    const int64_t t = target[row];
    const bool live = t != ignore_index;  // the whole block agrees: no divergence
    // A bad target poisons its row (the forward's loss is NaN too); an ignored row reads nothing.
    const float g = !live ? 0.0f : (t >= 0 && t < V ? grad_rows[row] : ce_nan());
    const float m = live ? row_max[row] : 0.0f;
    const float l = live ? log_sum[row] : 0.0f;
    // An ignored row is 0, or NaN where it holds NaN or +inf, as torch's log_softmax backward gives 0 * NaN.
    const float lse = row_max[row] + log_sum[row];
    const float ignored_fill = (isnan(lse) || lse == INFINITY) ? ce_nan() : 0.0f;

    if constexpr (!VECTOR) {
#pragma unroll 4
      for (int64_t c = tid; c < V; c += kCeThreads) {
        gr[c] = static_cast<T>(live ? ce_grad(static_cast<float>(xr[c]), c, t, m, l, g) : ignored_fill);
      }
    } else {
      int64_t head, packs;
      ce_split(xr, V, head, packs);
      const int64_t edge = ce_edge_col(tid, head, head + packs * VEC, V);
      if (edge >= 0) {
        gr[edge] = static_cast<T>(live ? ce_grad(static_cast<float>(xr[edge]), edge, t, m, l, g) : ignored_fill);
      }
      const T* xb = xr + head;
      T* gb = gr + head;
      if (!live) {
        float fill[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) fill[k] = ignored_fill;
#pragma unroll 4
        for (int64_t p = tid; p < packs; p += kCeThreads) ce_store_pack(gb + p * VEC, fill);
        continue;
      }
#pragma unroll 1
      for (int64_t p0 = tid; p0 < packs; p0 += int64_t(kCeBatch) * kCeThreads) {
        Pack<T, VEC> in[kCeBatch];
#pragma unroll
        for (int b = 0; b < kCeBatch; ++b) {
          const int64_t p = p0 + int64_t(b) * kCeThreads;
          if (p < packs) in[b] = load<T, VEC>(xb + p * VEC);
        }
#pragma unroll
        for (int b = 0; b < kCeBatch; ++b) {
          const int64_t p = p0 + int64_t(b) * kCeThreads;
          if (p < packs) {
            const int64_t col0 = head + p * VEC;
            float out[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = ce_grad(static_cast<float>(in[b].v[k]), col0 + k, t, m, l, g);
            ce_store_pack(gb + p * VEC, out);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

int ce_blocks(int64_t rows) { return static_cast<int>(std::min(rows, kCeMaxBlocks)); }

void check_inputs(const char* fn, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.is_cuda(), fn, ": logits must be a CUDA tensor, got ", logits.device());
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, fn,
              ": logits must be float32, float16 or bfloat16 (float64 runs on the cpu and torch backends), got ",
              type);
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), fn, ": logits must be a contiguous (N, V) tensor, got ",
              logits.sizes(), " with strides ", logits.strides());
  TORCH_CHECK(logits.size(1) > 0, fn, ": logits must have at least one class, got ", logits.sizes());
  TORCH_CHECK(target.device() == logits.device(), fn, ": target must be on logits' device ", logits.device(),
              ", got ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.is_contiguous() &&
                  target.scalar_type() == at::kLong,
              fn, ": target must be a contiguous int64 (", logits.size(0), ",) tensor, got ", target.scalar_type(),
              " ", target.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                                      const at::Tensor& target, int64_t ignore_index) {
  constexpr const char* fn = "cross_entropy_fwd_cuda";
  check_inputs(fn, logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto row_max = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto log_sum = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, row_max, log_sum};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTTX_DISPATCH_CROSS_ENTROPY_TYPES(logits.scalar_type(), fn, [&] {
    cross_entropy_fwd_kernel<scalar_t><<<ce_blocks(rows), kCeThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), loss.mutable_data_ptr<float>(),
        row_max.mutable_data_ptr<float>(), log_sum.mutable_data_ptr<float>(), rows, vocab, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, row_max, log_sum};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& row_max, const at::Tensor& log_sum, int64_t ignore_index) {
  constexpr const char* fn = "cross_entropy_bwd_cuda";
  check_inputs(fn, logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  for (const at::Tensor* t : {&grad_rows, &row_max, &log_sum}) {
    TORCH_CHECK(t->device() == logits.device() && t->dim() == 1 && t->size(0) == rows && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat,
                fn, ": grad_rows, row_max and log_sum must be contiguous float32 (", rows, ",) tensors on ",
                logits.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty_like(logits);
  if (rows == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTTX_DISPATCH_CROSS_ENTROPY_TYPES(logits.scalar_type(), fn, [&] {
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const bool vector = reinterpret_cast<uintptr_t>(xp) % 16 == reinterpret_cast<uintptr_t>(gp) % 16;
    const float* grp = grad_rows.const_data_ptr<float>();
    const int64_t* tp = target.const_data_ptr<int64_t>();
    const float* mp = row_max.const_data_ptr<float>();
    const float* lp = log_sum.const_data_ptr<float>();
    if (vector) {
      cross_entropy_bwd_kernel<scalar_t, true>
          <<<ce_blocks(rows), kCeThreads, 0, stream>>>(grp, xp, tp, mp, lp, gp, rows, vocab, ignore_index);
    } else {
      cross_entropy_bwd_kernel<scalar_t, false>
          <<<ce_blocks(rows), kCeThreads, 0, stream>>>(grp, xp, tp, mp, lp, gp, rows, vocab, ignore_index);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace fasttx
