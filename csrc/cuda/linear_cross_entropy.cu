// linear_cross_entropy's row kernel on CUDA: one chunk of logits (C, V), in place; the contract is
// linear_cross_entropy_rows_cpu in csrc/ops.h. With z = softcap(x) = c tanh(x / c) (z = x without
// softcap), m = max z, log_sum = log sum exp(z - m), eps the label smoothing:
//   loss = (1 - eps)(m - z_t) + eps / V * sum_j (m - z_j) + log_sum   (0 for an ignored row),
//   lse = m + log_sum, each fp32 (C,);
// with grad_rows, the row is overwritten by
//   g_n * (softmax(z) - (1 - eps) onehot(t) - eps / V) * (1 - (z / c)^2)   (0 for an ignored row).
// The GEMMs around it (the chunk's logits, dlogits @ W, dlogits^T @ h) are at::matmul / cuBLAS,
// called by fasttx/ops/linear_cross_entropy.py's chunk loop; the logits arrive as the GEMM's fp32
// output (bf16/fp16 inputs too), so fp32 is the case that matters; fp16/bf16 rows are served.
//
// One 256-thread block per row (a vocabulary row is far past a register tile): pass 1 keeps a
// running max and rescaled sum of exp per thread (online logsumexp), merged in a fixed tree (shfl_down
// within a warp, then the warps in order), so lse is bitwise reproducible; pass 2 (with a gradient or
// label smoothing) writes the gradient over the row and sums m - z_j the same way. Elements are
// moved one by one (coalesced across the warp), not in 16-byte packs as cross_entropy.cu does:
// the row kernel is a small share of a chunk next to its three GEMMs (2 C d V FLOPs each against
// a few passes over C V floats). exp is __expf of z - m <= 0; tanh is tanhf (accurate, no fast math).
//
// Targets: the Python layer rejects a target neither ignore_index nor in [0, V); this kernel does
// not raise, but such a target (only torch.compile can pass one) reads nothing and gives its row NaN.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace fasttx {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct MaxSum {
  float m;  // running max, -inf before any element
  float s;  // sum of exp(x - m)
};

__device__ __forceinline__ MaxSum merge(const MaxSum& a, const MaxSum& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// The block's shares merged in a fixed order; every thread gets the result.
__device__ MaxSum block_max_sum(MaxSum v, MaxSum* slots) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const MaxSum o{__shfl_down_sync(kFullMask, v.m, d), __shfl_down_sync(kFullMask, v.s, d)};
    v = merge(v, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  v = slots[0];
  for (int w = 1; w < kWarps; ++w) v = merge(v, slots[w]);
  __syncthreads();  // the slots are reused by the next reduction
  return v;
}

__device__ float block_sum(float v, float* slots) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(kFullMask, v, d);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  v = slots[0];
  for (int w = 1; w < kWarps; ++w) v += slots[w];
  __syncthreads();
  return v;
}

template <typename T>
__device__ __forceinline__ float capped(T x, float cap, float inv_cap, bool softcap) {
  const float v = static_cast<float>(x);
  return softcap ? cap * tanhf(v * inv_cap) : v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lce_rows_kernel(T* __restrict__ x, const int64_t* __restrict__ target,
                                                            const float* __restrict__ grad_rows, int64_t rows,
                                                            int64_t vocab, int64_t ignore_index, float eps, float cap,
                                                            float* __restrict__ loss, float* __restrict__ lse) {
  __shared__ MaxSum slots[kWarps];
  __shared__ float sum_slots[kWarps];
  const bool softcap = cap > 0.f;
  const float inv_cap = softcap ? 1.f / cap : 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* xr = x + row * vocab;
    MaxSum acc{-INFINITY, 0.f};
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
      const float z = capped(xr[j], cap, inv_cap, softcap);
      acc = merge(acc, MaxSum{z, 1.f});
    }
    const MaxSum total = block_max_sum(acc, slots);
    const float m = total.m, log_sum = logf(total.s);
    const int64_t t = target[row];
    const bool ignored = t == ignore_index;
    const bool valid = t >= 0 && t < vocab;
    const float z_t = valid ? capped(xr[t], cap, inv_cap, softcap) : 0.f;
    __syncthreads();  // every thread has read xr[t] before pass 2 overwrites it
    float row_loss = (1.f - eps) * (m - z_t) + log_sum;
    const bool grad = grad_rows != nullptr;
    if (grad || eps != 0.f) {
      const float g = grad ? (ignored ? 0.f : (valid ? grad_rows[row] : NAN)) : 0.f;
      const float smooth = eps / static_cast<float>(vocab);
      float part = 0.f;
      for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
        const float z = capped(xr[j], cap, inv_cap, softcap);
        part += m - z;
        if (grad) {
          float d = (__expf((z - m) - log_sum) - smooth - (j == t ? 1.f - eps : 0.f)) * g;
          if (softcap) {
            const float u = z * inv_cap;
            d *= 1.f - u * u;
          }
          xr[j] = static_cast<T>(d);
        }
      }
      if (eps != 0.f) row_loss += smooth * block_sum(part, sum_slots);
    }
    if (threadIdx.x == 0) {
      loss[row] = ignored ? 0.f : (valid ? row_loss : NAN);
      lse[row] = m + log_sum;
    }
  }
}

template <typename T>
void launch_rows(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& grad_rows,
                 int64_t rows, int64_t vocab, int64_t ignore_index, double label_smoothing, double softcap,
                 at::Tensor& loss, at::Tensor& lse, int64_t blocks) {
  lce_rows_kernel<T><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<T>(), target.data_ptr<int64_t>(), grad_rows ? grad_rows->data_ptr<float>() : nullptr, rows,
      vocab, ignore_index, static_cast<float>(label_smoothing), static_cast<float>(softcap), loss.data_ptr<float>(),
      lse.data_ptr<float>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_rows_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& grad_rows,
                                                                  int64_t ignore_index, double label_smoothing,
                                                                  double softcap) {
  const char* op = "linear_cross_entropy_rows_cuda";
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0, op,
              ": logits must be a contiguous CUDA (C, V) tensor with V > 0, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              op, ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(target.device() == logits.device() && target.dim() == 1 && target.size(0) == logits.size(0) &&
                  target.is_contiguous() && target.scalar_type() == at::kLong,
              op, ": target must be a contiguous int64 (", logits.size(0), ",) tensor on ", logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (grad_rows) {
    TORCH_CHECK(grad_rows->device() == logits.device() && grad_rows->dim() == 1 && grad_rows->size(0) == rows &&
                    grad_rows->is_contiguous() && grad_rows->scalar_type() == at::kFloat,
                op, ": grad_rows must be a contiguous float32 (", rows, ",) tensor on ", logits.device());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {loss, lse};
  const int64_t blocks = std::min<int64_t>(rows, 65535);
  // float32, float16 and bfloat16 only: the Python layer's why_not (up_to_float32) refuses float64.
  AT_DISPATCH_SWITCH(logits.scalar_type(), "linear_cross_entropy_rows_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch_rows<scalar_t>(logits, target, grad_rows, rows, vocab,
                                                                             ignore_index, label_smoothing, softcap,
                                                                             loss, lse, blocks); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch_rows<scalar_t>(logits, target, grad_rows, rows, vocab,
                                                                            ignore_index, label_smoothing, softcap,
                                                                            loss, lse, blocks); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch_rows<scalar_t>(logits, target, grad_rows, rows,
                                                                                vocab, ignore_index, label_smoothing,
                                                                                softcap, loss, lse, blocks); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

}  // namespace fasttx
