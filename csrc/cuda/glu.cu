// glu on CUDA: y = act(gate) * up and its backward, and the fused glu passes
// of glu_ffn.cu (the backward one also writing the recomputed product).
//
// Memory bound: the forward reads 2 and writes 1 element per element, the
// backward reads 3 and writes 2 (3 with the product). So: 16-byte packs
// (LDG.128/STG.128) when the element count and pointers allow, a scalar
// fallback otherwise; a grid-stride loop over one wave of blocks; fp32 math
// (csrc/common/activation.h, the formulas the CPU tests check), one rounding.
#include "common/activation.h"
#include "ops.h"
#include "cuda/cuda_math.cuh"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fasttx {
namespace {

constexpr int kGluThreads = 256;

// float32, float16, bfloat16: float64 goes to the torch backend (fasttx/ops/glu.py), as gelu_ffn's does.
// (A double gelu_tanh backward spilled 8 bytes on sm_90 in ::tanh's slow path.)
#define FASTTX_DISPATCH_GLU_TYPES(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T, int VEC, Activation A>
__global__ void __launch_bounds__(kGluThreads)
    glu_forward_kernel(T* __restrict__ y, const T* __restrict__ gate, const T* __restrict__ up, int64_t n_vec) {
  using Acc = at::opmath_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const Pack<T, VEC> z = load<T, VEC>(gate + i * VEC);
    const Pack<T, VEC> u = load<T, VEC>(up + i * VEC);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = T(activation::forward<CudaMath>(Acc(z.v[k]), A) * Acc(u.v[k]));
    store<T, VEC>(y + i * VEC, out);
  }
}

// grad_gate may be grad (in place: each pack is read before it is written), so neither is __restrict__.
// prod (act(gate) * up) is written when not null.
template <typename T, int VEC, Activation A>
__global__ void __launch_bounds__(kGluThreads)
    glu_backward_kernel(T* grad_gate, T* __restrict__ grad_up, T* __restrict__ prod, const T* grad,
                        const T* __restrict__ gate, const T* __restrict__ up, int64_t n_vec) {
  using Acc = at::opmath_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const Pack<T, VEC> g = load<T, VEC>(grad + i * VEC);
    const Pack<T, VEC> z = load<T, VEC>(gate + i * VEC);
    const Pack<T, VEC> u = load<T, VEC>(up + i * VEC);
    Pack<T, VEC> dg, du, p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      Acc a, da;
      activation::forward_and_grad<CudaMath>(Acc(z.v[k]), A, a, da);
      dg.v[k] = T(Acc(g.v[k]) * Acc(u.v[k]) * da);
      du.v[k] = T(Acc(g.v[k]) * a);
      p.v[k] = T(a * Acc(u.v[k]));
    }
    store<T, VEC>(grad_gate + i * VEC, dg);
    store<T, VEC>(grad_up + i * VEC, du);
    if (prod != nullptr) store<T, VEC>(prod + i * VEC, p);
  }
}

bool glu_aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename F>
void with_glu_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kSilu: f(std::integral_constant<Activation, Activation::kSilu>{}); break;
    case Activation::kGeluTanh: f(std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
    default: f(std::integral_constant<Activation, Activation::kGelu>{}); break;
  }
}

// Launches kernel over n_vec packs: one wave of blocks at most, the grid-stride loop does the rest.
template <typename Kernel, typename... Args>
void launch_flat(Kernel kernel, int64_t n_vec, int device, Args... args) {
  int sms = 0, blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kGluThreads, 0));
  const int64_t blocks = std::min<int64_t>((n_vec + kGluThreads - 1) / kGluThreads,
                                           std::max<int64_t>(1, int64_t(sms) * blocks_per_sm));
  kernel<<<static_cast<unsigned>(blocks), kGluThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args..., n_vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Activation check_glu_activation(const char* fn, int64_t activation) {
  TORCH_CHECK(activation == 0 || activation == 1 || activation == 3, fn,
              ": activation must be 0 (gelu), 1 (gelu_tanh) or 3 (silu), got ", activation);
  return static_cast<Activation>(activation);
}

void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& gate) {
  TORCH_CHECK(t.device() == gate.device(), fn, ": ", name, " must be on gate's device ", gate.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == gate.scalar_type(), fn, ": ", name, " must have gate's dtype ",
              gate.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == gate.sizes() && t.is_contiguous(), fn, ": ", name, " must be contiguous of gate's sizes ",
              gate.sizes(), ", got sizes ", t.sizes(), " and strides ", t.strides());
}

void check_gate(const char* fn, const at::Tensor& gate) {
  TORCH_CHECK(gate.is_cuda(), fn, ": gate must be a CUDA tensor, got ", gate.device());
  TORCH_CHECK(gate.is_contiguous(), fn, ": gate must be contiguous, got strides ", gate.strides());
  const auto t = gate.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, fn,
              ": gate must be float32, float16 or bfloat16, got ", t);
}

}  // namespace

// The passes, also glu_ffn.cu's: y = act(gate) * up; and grad_gate (may be grad), grad_up and, when
// defined, prod. All contiguous, one dtype and numel, on the current device.
void glu_forward_pass(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& up, Activation act) {
  if (gate.numel() == 0) return;
  FASTTX_DISPATCH_GLU_TYPES(gate.scalar_type(), "glu_forward_pass", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* yp = y.mutable_data_ptr<scalar_t>();
    const auto* zp = gate.const_data_ptr<scalar_t>();
    const auto* up_p = up.const_data_ptr<scalar_t>();
    const bool vectorized = gate.numel() % kVec == 0 && glu_aligned16(yp) && glu_aligned16(zp) && glu_aligned16(up_p);
    with_glu_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (vectorized) {
        launch_flat(glu_forward_kernel<scalar_t, kVec, A>, gate.numel() / kVec, gate.get_device(), yp, zp, up_p);
      } else {
        launch_flat(glu_forward_kernel<scalar_t, 1, A>, gate.numel(), gate.get_device(), yp, zp, up_p);
      }
    });
  });
}

void glu_backward_pass(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor& grad_gate, const at::Tensor& grad_up, const at::Tensor& prod,
                       Activation act) {
  if (gate.numel() == 0) return;
  FASTTX_DISPATCH_GLU_TYPES(gate.scalar_type(), "glu_backward_pass", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* dgp = grad_gate.mutable_data_ptr<scalar_t>();
    auto* dup = grad_up.mutable_data_ptr<scalar_t>();
    auto* pp = prod.defined() ? prod.mutable_data_ptr<scalar_t>() : nullptr;
    const auto* gp = grad.const_data_ptr<scalar_t>();
    const auto* zp = gate.const_data_ptr<scalar_t>();
    const auto* up_p = up.const_data_ptr<scalar_t>();
    const bool vectorized = gate.numel() % kVec == 0 && glu_aligned16(dgp) && glu_aligned16(dup) &&
                            glu_aligned16(pp) && glu_aligned16(gp) && glu_aligned16(zp) && glu_aligned16(up_p);
    with_glu_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      if (vectorized) {
        launch_flat(glu_backward_kernel<scalar_t, kVec, A>, gate.numel() / kVec, gate.get_device(), dgp, dup, pp,
                    gp, zp, up_p);
      } else {
        launch_flat(glu_backward_kernel<scalar_t, 1, A>, gate.numel(), gate.get_device(), dgp, dup, pp, gp, zp,
                    up_p);
      }
    });
  });
}

Activation glu_activation_cuda(const char* fn, int64_t activation) { return check_glu_activation(fn, activation); }

at::Tensor glu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, int64_t activation) {
  constexpr const char* fn = "glu_fwd_cuda";
  check_gate(fn, gate);
  check_like(fn, "up", up, gate);
  const Activation act = check_glu_activation(fn, activation);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto y = at::empty_like(gate);
  glu_forward_pass(y, gate, up, act);
  return y;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cuda(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                                int64_t activation) {
  constexpr const char* fn = "glu_bwd_cuda";
  check_gate(fn, gate);
  check_like(fn, "up", up, gate);
  check_like(fn, "grad", grad, gate);
  const Activation act = check_glu_activation(fn, activation);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto grad_gate = at::empty_like(gate), grad_up = at::empty_like(up);
  glu_backward_pass(grad, gate, up, grad_gate, grad_up, at::Tensor(), act);
  return {grad_gate, grad_up};
}

}  // namespace fasttx
