// gelu_ffn on CUDA: out = act(x w1^T + b1) w2^T + b2 and its backward, on
// cuBLASLt (the contract is gelu_ffn_fwd_cpu / gelu_ffn_bwd_cpu in csrc/ops.h).
//
// The GEMMs are the work. What is left is to cross the (M, H) hidden
// activations as few times as possible, so the rest rides in GEMM epilogues:
//  - cuBLASLt's GELU is the tanh approximation, so for gelu_tanh in bf16 the
//    first GEMM writes act(preact) and preact at once (GELU_AUX_BIAS), and the
//    backward's grad_out w2 GEMM applies gelu'(preact) and sums grad_b1
//    (DGELU_BGRAD); fp16 and fp32 take the pass below (gelu_epilogue_fits);
//  - gelu (erf) and relu have no cuBLASLt epilogue that also keeps preact, so
//    the GEMM adds the bias (BIAS) and one elementwise pass of 16-byte packs
//    applies act or act' with csrc/common/activation.h, the arithmetic the CPU
//    tests check;
//  - bias gradients are column sums of a weight-gradient GEMM's B operand, which
//    its epilogue produces for free (BGRADB);
//  - when cuBLASLt declines an epilogue (aux ld not a multiple of 8, a bias it
//    cannot read at that alignment), the plain GEMM and fasttx kernels produce
//    the same result instead of failing.
// No fasttx reduction uses atomics, and cuBLAS documents its results as bitwise
// reproducible for a given version, GPU architecture and SM count, so the
// backward is deterministic run to run.
#include "common/activation.h"
#include "ops.h"
#include "cuda/cuda_math.cuh"
#include "cuda/lt_gemm.cuh"
#include "cuda/pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDADataType.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

namespace fasttx {
namespace {

// y = act(z) over a flat array of n_vec packs.
template <typename T, int VEC, Activation A>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(T* __restrict__ y, const T* __restrict__ z, int64_t n_vec) {
  using Acc = at::opmath_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const Pack<T, VEC> in = load<T, VEC>(z + i * VEC);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = T(activation::forward<CudaMath>(Acc(in.v[k]), A));
    store<T, VEC>(y + i * VEC, out);
  }
}

// grad *= act'(z), in place: grad_a becomes grad_h without a second (M, H) buffer.
template <typename T, int VEC, Activation A>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(T* __restrict__ grad, const T* __restrict__ z, int64_t n_vec) {
  using Acc = at::opmath_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += step) {
    const Pack<T, VEC> in = load<T, VEC>(z + i * VEC);
    Pack<T, VEC> g = load<T, VEC>(grad + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g.v[k] = T(activation::backward<CudaMath>(Acc(g.v[k]), Acc(in.v[k]), A));
    store<T, VEC>(grad + i * VEC, g);
  }
}


// Calls f(std::integral_constant<Activation, act>), so each kernel is compiled
// per activation with no runtime branching.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kGeluTanh: f(std::integral_constant<Activation, Activation::kGeluTanh>{}); break;
    case Activation::kRelu: f(std::integral_constant<Activation, Activation::kRelu>{}); break;
    default: f(std::integral_constant<Activation, Activation::kGelu>{}); break;
  }
}


// out = act(z) when forward, else out *= act'(z); out and z are (M, H)
// contiguous, so the pass is flat and vectorizes whenever M H and the pointers allow.
void activation_pass(const at::Tensor& out, const at::Tensor& z, Activation act, bool forward) {
  FASTTX_DISPATCH_FFN_TYPES(z.scalar_type(), "gelu_ffn_activation", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* op = out.mutable_data_ptr<scalar_t>();
    const auto* zp = z.const_data_ptr<scalar_t>();
    const bool vectorized = z.numel() % kVec == 0 && aligned16(op) && aligned16(zp);
    with_activation(act, [&](auto a) {
      auto launch = [&](auto kernel, int vec) {
        const int64_t n_vec = z.numel() / vec;
        const int64_t blocks = std::min((n_vec + kThreads - 1) / kThreads, wave(kernel, z.get_device()));
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, zp, n_vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      constexpr Activation A = decltype(a)::value;
      if (forward && vectorized) {
        launch(activation_forward_kernel<scalar_t, kVec, A>, kVec);
      } else if (forward) {
        launch(activation_forward_kernel<scalar_t, 1, A>, 1);
      } else if (vectorized) {
        launch(activation_backward_kernel<scalar_t, kVec, A>, kVec);
      } else {
        launch(activation_backward_kernel<scalar_t, 1, A>, 1);
      }
    });
  });
}


// cuBLASLt's GELU aux matrix (preact here, ld H) needs an ld divisible by 8. Its GELU's accuracy is
// not documented, so the epilogues serve bf16 only, where even tanh.approx's 2^-11 relative error
// stays under half an output ulp (2^-9); fp16 (ulp 2^-11) and fp32 take the accurate activation pass.
bool gelu_epilogue_fits(Activation act, int64_t h, at::ScalarType dtype) {
  return act == Activation::kGeluTanh && h % 8 == 0 && dtype == at::kBFloat16;
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected && t.is_contiguous(), fn, ": ", name, " must be contiguous of sizes ",
              expected, ", got sizes ", t.sizes(), " and strides ", t.strides());
}

// Checks x and returns its (M, D).
std::pair<int64_t, int64_t> check_x(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous (M, D) tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  return {x.size(0), x.size(1)};
}

// The row count of a weight that must be 2-D, e.g. H of w1 (H, D).
int64_t weight_rows(const char* fn, const char* name, const at::Tensor& w, const char* shape) {
  TORCH_CHECK(w.dim() == 2, fn, ": ", name, " must be a ", shape, " matrix, got sizes ", w.sizes());
  return w.size(0);
}

void check_dims(const char* fn, int64_t d, int64_t h, int64_t d2) {
  TORCH_CHECK(d > 0 && h > 0 && d2 > 0, fn, ": D, H and D2 must be positive, got D = ", d, ", H = ", h,
              ", D2 = ", d2);
}

Activation check_activation(const char* fn, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2, fn,
              ": activation must be 0 (gelu), 1 (gelu_tanh) or 2 (relu), got ", activation);
  return static_cast<Activation>(activation);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                     const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                     const std::optional<at::Tensor>& b2, int64_t activation) {
  constexpr const char* fn = "gelu_ffn_fwd_cuda";
  const auto [m, d] = check_x(fn, x);
  const int64_t h = weight_rows(fn, "w1", w1, "(H, D)");
  const int64_t d2 = weight_rows(fn, "w2", w2, "(D2, H)");
  check_dims(fn, d, h, d2);
  check_tensor(fn, "w1", w1, x, {h, d});
  check_tensor(fn, "w2", w2, x, {d2, h});
  if (b1.has_value()) check_tensor(fn, "b1", *b1, x, {h});
  if (b2.has_value()) check_tensor(fn, "b2", *b2, x, {d2});
  const Activation act = check_activation(fn, activation);

  const c10::cuda::CUDAGuard guard(x.device());
  auto preact = at::empty({m, h}, x.options());
  auto out = at::empty({m, d2}, x.options());
  if (m == 0) return {out, preact};
  const Lt lt(x);
  auto a = at::empty_like(preact);

  const Gemm up{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d,
                .a = w1.const_data_ptr(), .b = x.const_data_ptr(), .d = preact.mutable_data_ptr()};
  Gemm fused = up;  // writes a, with preact as its aux output
  fused.d = a.mutable_data_ptr();
  fused.epilogue = b1.has_value() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  fused.bias = b1.has_value() ? b1->data_ptr() : nullptr;
  fused.aux = preact.mutable_data_ptr();
  if (!gelu_epilogue_fits(act, h, x.scalar_type()) || !lt.try_gemm(fused)) {
    lt.gemm_bias(up, preact, b1);
    activation_pass(a, preact, act, /*forward=*/true);
  }
  lt.gemm_bias(Gemm{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = d2, .n = m, .k = h,
                    .a = w2.const_data_ptr(), .b = a.const_data_ptr(), .d = out.mutable_data_ptr()},
               out, b2);
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact, const at::Tensor& w1,
    const at::Tensor& w2, bool has_b1, bool has_b2, int64_t activation) {
  constexpr const char* fn = "gelu_ffn_bwd_cuda";
  const auto [m, d] = check_x(fn, x);
  const int64_t h = weight_rows(fn, "w1", w1, "(H, D)");
  const int64_t d2 = weight_rows(fn, "w2", w2, "(D2, H)");
  check_dims(fn, d, h, d2);
  check_tensor(fn, "w1", w1, x, {h, d});
  check_tensor(fn, "w2", w2, x, {d2, h});
  check_tensor(fn, "grad_out", grad_out, x, {m, d2});
  check_tensor(fn, "preact", preact, x, {m, h});
  const Activation act = check_activation(fn, activation);

  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_w1 = at::empty_like(w1);
  auto grad_w2 = at::empty_like(w2);
  auto grad_b1 = has_b1 ? at::empty({h}, x.options()) : at::Tensor();
  auto grad_b2 = has_b2 ? at::empty({d2}, x.options()) : at::Tensor();
  if (m == 0) {
    for (auto* t : {&grad_w1, &grad_w2, &grad_b1, &grad_b2}) {
      if (t->defined()) t->zero_();
    }
    return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
  }
  const Lt lt(x);

  // grad_w2 needs act(preact), which the forward did not keep.
  auto a = at::empty_like(preact);
  activation_pass(a, preact, act, /*forward=*/true);
  lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = h, .n = d2, .k = m,
                      .a = a.const_data_ptr(), .b = grad_out.const_data_ptr(), .d = grad_w2.mutable_data_ptr()},
                 grad_out, grad_b2);

  auto grad_h = at::empty_like(preact);
  const Gemm down{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d2,
                  .a = w2.const_data_ptr(), .b = grad_out.const_data_ptr(), .d = grad_h.mutable_data_ptr()};
  Gemm fused = down;  // grad_h = grad_a gelu'(preact), and grad_b1
  fused.epilogue = has_b1 ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
  fused.bias = has_b1 ? grad_b1.data_ptr() : nullptr;
  fused.aux = const_cast<void*>(preact.const_data_ptr());
  const bool dgelu_fused = gelu_epilogue_fits(act, h, grad_out.scalar_type()) && lt.try_gemm(fused);
  if (!dgelu_fused) {
    lt.gemm(down);
    activation_pass(grad_h, preact, act, /*forward=*/false);
  }
  lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = d, .n = h, .k = m,
                      .a = x.const_data_ptr(), .b = grad_h.const_data_ptr(), .d = grad_w1.mutable_data_ptr()},
                 grad_h, dgelu_fused ? at::Tensor() : grad_b1);
  lt.gemm(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = d, .n = m, .k = h,
               .a = w1.const_data_ptr(), .b = grad_h.const_data_ptr(), .d = grad_x.mutable_data_ptr()});
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace fasttx
