// bias + GELU on CUDA: y = gelu(x + bias), and its backward.
//
// Both passes are memory bound: the forward reads x and writes y (2 MN
// elements), the backward reads grad and x and writes grad_x (3 MN), and bias
// is noise next to that. So the kernels do what moves bytes fastest:
//  - 16-byte loads and stores (LDG.128/STG.128) whenever N and the pointers
//    allow, a scalar fallback otherwise, so any N works;
//  - a 2-D launch in which a thread keeps one column vector for all its rows,
//    so bias is loaded once into registers and no per-element (int64) modulo
//    is needed to find the column;
//  - the backward folds the grad_bias column sums into the same pass over
//    grad_x, in fp32, through a fixed-order reduction (no atomics), so the
//    result is bitwise deterministic run to run.
// The arithmetic is csrc/common/gelu.h, the same templates the CPU tests check.
#include "common/gelu.h"
#include "ops.h"
#include "cuda/cuda_math.cuh"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fasttx {
namespace {

constexpr int kThreads = 256;


// Thread (tx, ty) of block (bx, by) owns columns [col, col + VEC) with
// col = (bx * blockDim.x + tx) * VEC, and rows by * blockDim.y + ty, stepping by
// gridDim.y * blockDim.y.
template <typename T, int VEC, GeluApprox A>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_forward_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ bias,
                             int64_t m, int64_t n) {
  using Acc = at::opmath_type<T>;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= n) return;
  const Pack<T, VEC> b = load<T, VEC>(bias + col);
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < m; row += row_step) {
    const int64_t i = row * n + col;
    const Pack<T, VEC> in = load<T, VEC>(x + i);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out.v[k] = T(gelu::forward<CudaMath>(Acc(in.v[k]) + Acc(b.v[k]), A));
    }
    store<T, VEC>(y + i, out);
  }
}

// Same walk as the forward. Each thread also sums its columns' grad_x over its
// rows in registers; the blockDim.y threads of a column then add their sums in
// shared memory in ty order, and the block writes one row of partial[gridDim.y, n].
template <typename T, int VEC, GeluApprox A>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_backward_kernel(T* __restrict__ grad_x, at::opmath_type<T>* __restrict__ partial,
                              const T* __restrict__ grad, const T* __restrict__ x,
                              const T* __restrict__ bias, int64_t m, int64_t n) {
  using Acc = at::opmath_type<T>;
  __shared__ Acc column_sums[kThreads * VEC];
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  Acc sum[VEC] = {};
  if (col < n) {
    const Pack<T, VEC> b = load<T, VEC>(bias + col);
    const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
    for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < m; row += row_step) {
      const int64_t i = row * n + col;
      const Pack<T, VEC> g = load<T, VEC>(grad + i);
      const Pack<T, VEC> in = load<T, VEC>(x + i);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const Acc d = Acc(g.v[k]) * gelu::grad<CudaMath>(Acc(in.v[k]) + Acc(b.v[k]), A);
        out.v[k] = T(d);
        sum[k] += d;
      }
      store<T, VEC>(grad_x + i, out);
    }
  }
  // Layout [ty][k][tx]: consecutive tx hit consecutive banks on write and read.
#pragma unroll
  for (int k = 0; k < VEC; ++k) column_sums[(threadIdx.y * VEC + k) * blockDim.x + threadIdx.x] = sum[k];
  __syncthreads();
  if (threadIdx.y != 0 || col >= n) return;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    Acc s = 0;
    for (int j = 0; j < int(blockDim.y); ++j) s += column_sums[(j * VEC + k) * blockDim.x + threadIdx.x];
    partial[int64_t(blockIdx.y) * n + col + k] = s;
  }
}

// grad_bias[j] = sum over b of partial[b, j], b in increasing order: the fixed
// order that makes grad_bias deterministic. Reads are coalesced across j, and
// partial has only gridDim.y (about one wave of blocks) rows.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(T* __restrict__ out, const at::opmath_type<T>* __restrict__ partial, int64_t rows,
                      int64_t n) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  at::opmath_type<T> s = 0;
  for (int64_t r = 0; r < rows; ++r) s += partial[r * n + j];
  out[j] = T(s);
}

// Block (tx, ty) with tx * ty = kThreads: tx covers the row's column vectors
// (rounded up to a power of two, so small N packs several rows per warp), and
// the grid is one wave of resident blocks, so each thread walks many rows.
struct Launch {
  dim3 grid, block;
};

template <typename Kernel>
Launch plan(Kernel kernel, int64_t m, int64_t n_vec, int device) {
  int tx = 1;
  while (tx < n_vec && tx < kThreads) tx *= 2;
  const int ty = kThreads / tx;
  int sms = 0, blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  const int64_t col_blocks = (n_vec + tx - 1) / tx;
  const int64_t wave = int64_t(sms) * blocks_per_sm;
  const int64_t row_blocks = std::min((m + ty - 1) / ty, std::max<int64_t>(1, wave / col_blocks));
  return {dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks)), dim3(tx, ty)};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls f(vec, approx) with both as std::integral_constant, so each kernel is
// compiled for its vector width and GELU variant with no runtime branching.
template <int kVec, typename F>
void with_static(bool vectorized, GeluApprox approx, F&& f) {
  auto pick_approx = [&](auto vec) {
    if (approx == GeluApprox::kTanh) {
      f(vec, std::integral_constant<GeluApprox, GeluApprox::kTanh>{});
    } else {
      f(vec, std::integral_constant<GeluApprox, GeluApprox::kNone>{});
    }
  };
  if (vectorized) {
    pick_approx(std::integral_constant<int, kVec>{});
  } else {
    pick_approx(std::integral_constant<int, 1>{});
  }
}

void check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous 2-D tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(bias.device() == x.device(), fn, ": bias must be on x's device ", x.device(), ", got ",
              bias.device());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), fn, ": bias must have x's dtype ", x.scalar_type(),
              ", got ", bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(1) && bias.is_contiguous(), fn,
              ": bias must be a contiguous (", x.size(1), ",) tensor, got sizes ", bias.sizes());
  TORCH_CHECK(approximate == 0 || approximate == 1, fn, ": approximate must be 0 (erf) or 1 (tanh), got ",
              approximate);
}

}  // namespace

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  check_inputs("bias_gelu_fwd_cuda", x, bias, approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t m = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* bp = bias.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    const bool vectorized = n % kVec == 0 && aligned16(xp) && aligned16(bp) && aligned16(yp);
    with_static<kVec>(vectorized, static_cast<GeluApprox>(approximate), [&](auto vec, auto approx) {
      constexpr int V = decltype(vec)::value;
      const auto kernel = bias_gelu_forward_kernel<scalar_t, V, decltype(approx)::value>;
      const Launch l = plan(kernel, m, n / V, x.get_device());
      kernel<<<l.grid, l.block, 0, c10::cuda::getCurrentCUDAStream()>>>(yp, xp, bp, m, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& bias, int64_t approximate) {
  check_inputs("bias_gelu_bwd_cuda", x, bias, approximate);
  TORCH_CHECK(grad.device() == x.device(), "bias_gelu_bwd_cuda: grad must be on x's device ", x.device(),
              ", got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "bias_gelu_bwd_cuda: grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous(),
              "bias_gelu_bwd_cuda: grad must be contiguous with x's sizes ", x.sizes(), ", got sizes ",
              grad.sizes(), " and strides ", grad.strides());
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_x, at::zeros_like(bias)};
  auto grad_bias = at::empty_like(bias);
  const int64_t m = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_bwd_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* gp = grad.const_data_ptr<scalar_t>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* bp = bias.const_data_ptr<scalar_t>();
    auto* dxp = grad_x.mutable_data_ptr<scalar_t>();
    const bool vectorized =
        n % kVec == 0 && aligned16(gp) && aligned16(xp) && aligned16(bp) && aligned16(dxp);
    with_static<kVec>(vectorized, static_cast<GeluApprox>(approximate), [&](auto vec, auto approx) {
      constexpr int V = decltype(vec)::value;
      const auto kernel = bias_gelu_backward_kernel<scalar_t, V, decltype(approx)::value>;
      const Launch l = plan(kernel, m, n / V, x.get_device());
      auto partial = at::empty({int64_t(l.grid.y), n}, x.options().dtype(at::toOpMathType(x.scalar_type())));
      auto* pp = partial.mutable_data_ptr<Acc>();
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      kernel<<<l.grid, l.block, 0, stream>>>(dxp, pp, gp, xp, bp, m, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
      column_sum_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          grad_bias.mutable_data_ptr<scalar_t>(), pp, int64_t(l.grid.y), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_bias};
}

}  // namespace fasttx
