// glu_ffn on CUDA: out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down
// and its backward (the contract is glu_ffn_fwd_cpu / glu_ffn_bwd_cpu in csrc/ops.h).
//
// The GEMMs are gelu_ffn's cuBLASLt ones (cuda/lt_gemm.cuh): biases in the BIAS
// epilogue, bias gradients from the weight-gradient GEMMs' BGRADB. cuBLASLt has
// no gated epilogue (act(gate) * up needs two GEMMs' outputs at once), so
// between the GEMMs run glu.cu's fused passes: forward, one read of gate and up
// and one write of the product; backward, one read of grad_prod, gate and up
// writing grad_gate (in place of grad_prod), grad_up and the product that
// grad_w_down needs, recomputed rather than kept from the forward.
// No atomics: deterministic run to run, as gelu_ffn.
#include "common/activation.h"
#include "ops.h"
#include "cuda/lt_gemm.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <utility>

namespace fasttx {

// glu.cu's.
void glu_forward_pass(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& up, Activation act);
void glu_backward_pass(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor& grad_gate, const at::Tensor& grad_up, const at::Tensor& prod,
                       Activation act);
Activation glu_activation_cuda(const char* fn, int64_t activation);

namespace {

void check_operand(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                   at::IntArrayRef expected) {
  TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " must be on x's device ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == expected && t.is_contiguous(), fn, ": ", name, " must be contiguous of sizes ",
              expected, ", got sizes ", t.sizes(), " and strides ", t.strides());
}

// Checks x and the weights; returns (M, D, H, D2).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_glu_ffn(const char* fn, const at::Tensor& x,
                                                            const at::Tensor& w_gate, const at::Tensor& w_up,
                                                            const at::Tensor& w_down) {
  TORCH_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), fn, ": x must be a contiguous (M, D) tensor, got sizes ",
              x.sizes(), " and strides ", x.strides());
  TORCH_CHECK(w_gate.dim() == 2 && w_down.dim() == 2, fn, ": w_gate and w_down must be 2-D, got sizes ",
              w_gate.sizes(), " and ", w_down.sizes());
  const int64_t m = x.size(0), d = x.size(1), h = w_gate.size(0), d2 = w_down.size(0);
  TORCH_CHECK(d > 0 && h > 0 && d2 > 0, fn, ": D, H and D2 must be positive, got D = ", d, ", H = ", h,
              ", D2 = ", d2);
  check_operand(fn, "w_gate", w_gate, x, {h, d});
  check_operand(fn, "w_up", w_up, x, {h, d});
  check_operand(fn, "w_down", w_down, x, {d2, h});
  return {m, d, h, d2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_ffn_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    int64_t activation) {
  constexpr const char* fn = "glu_ffn_fwd_cuda";
  const auto [m, d, h, d2] = check_glu_ffn(fn, x, w_gate, w_up, w_down);
  if (b_gate.has_value()) check_operand(fn, "b_gate", *b_gate, x, {h});
  if (b_up.has_value()) check_operand(fn, "b_up", *b_up, x, {h});
  if (b_down.has_value()) check_operand(fn, "b_down", *b_down, x, {d2});
  const Activation act = glu_activation_cuda(fn, activation);

  const c10::cuda::CUDAGuard guard(x.device());
  auto gate = at::empty({m, h}, x.options()), up = at::empty({m, h}, x.options());
  auto out = at::empty({m, d2}, x.options());
  if (m == 0) return {out, gate, up};
  const Lt lt(x);
  // gate' = w_gate'^T x' and up' = w_up'^T x' (H x M x D, T N), bias along H.
  lt.gemm_bias(Gemm{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d,
                    .a = w_gate.const_data_ptr(), .b = x.const_data_ptr(), .d = gate.mutable_data_ptr()},
               gate, b_gate);
  lt.gemm_bias(Gemm{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d,
                    .a = w_up.const_data_ptr(), .b = x.const_data_ptr(), .d = up.mutable_data_ptr()},
               up, b_up);
  auto prod = at::empty_like(gate);
  glu_forward_pass(prod, gate, up, act);
  lt.gemm_bias(Gemm{.op_a = CUBLAS_OP_T, .op_b = CUBLAS_OP_N, .m = d2, .n = m, .k = h,
                    .a = w_down.const_data_ptr(), .b = prod.const_data_ptr(), .d = out.mutable_data_ptr()},
               out, b_down);
  return {out, gate, up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_ffn_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate, bool has_b_up,
    bool has_b_down, int64_t activation) {
  constexpr const char* fn = "glu_ffn_bwd_cuda";
  const auto [m, d, h, d2] = check_glu_ffn(fn, x, w_gate, w_up, w_down);
  check_operand(fn, "grad_out", grad_out, x, {m, d2});
  check_operand(fn, "gate", gate, x, {m, h});
  check_operand(fn, "up", up, x, {m, h});
  const Activation act = glu_activation_cuda(fn, activation);

  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_w_gate = at::empty_like(w_gate), grad_w_up = at::empty_like(w_up), grad_w_down = at::empty_like(w_down);
  auto grad_b_gate = has_b_gate ? at::empty({h}, x.options()) : at::Tensor();
  auto grad_b_up = has_b_up ? at::empty({h}, x.options()) : at::Tensor();
  auto grad_b_down = has_b_down ? at::empty({d2}, x.options()) : at::Tensor();
  if (m == 0) {
    for (auto* t : {&grad_w_gate, &grad_w_up, &grad_w_down, &grad_b_gate, &grad_b_up, &grad_b_down}) {
      if (t->defined()) t->zero_();
    }
    return {grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up, grad_w_down, grad_b_down};
  }
  const Lt lt(x);

  // grad_prod' = w_down' grad_out' (H x M x D2, N N), then the glu pass: grad_gate in its place,
  // grad_up, and the product act(gate) * up for grad_w_down.
  auto grad_gate = at::empty_like(gate);
  lt.gemm(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = h, .n = m, .k = d2,
               .a = w_down.const_data_ptr(), .b = grad_out.const_data_ptr(), .d = grad_gate.mutable_data_ptr()});
  auto grad_up = at::empty_like(up);
  {
    auto prod = at::empty_like(gate);
    glu_backward_pass(grad_gate, gate, up, grad_gate, grad_up, prod, act);
    // grad_w_down' = prod' grad_out'^T (H x D2 x M, N T), grad_b_down from BGRADB.
    lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = h, .n = d2, .k = m,
                        .a = prod.const_data_ptr(), .b = grad_out.const_data_ptr(),
                        .d = grad_w_down.mutable_data_ptr()},
                   grad_out, grad_b_down);
  }
  // grad_w_gate' = x' grad_gate'^T (D x H x M, N T), and the same for up.
  lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = d, .n = h, .k = m,
                      .a = x.const_data_ptr(), .b = grad_gate.const_data_ptr(), .d = grad_w_gate.mutable_data_ptr()},
                 grad_gate, grad_b_gate);
  lt.weight_grad(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_T, .m = d, .n = h, .k = m,
                      .a = x.const_data_ptr(), .b = grad_up.const_data_ptr(), .d = grad_w_up.mutable_data_ptr()},
                 grad_up, grad_b_up);
  // grad_x' = w_gate' grad_gate' + w_up' grad_up' (D x M x H, N N), the second accumulated.
  lt.gemm(Gemm{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = d, .n = m, .k = h,
               .a = w_gate.const_data_ptr(), .b = grad_gate.const_data_ptr(), .d = grad_x.mutable_data_ptr()});
  Gemm second{.op_a = CUBLAS_OP_N, .op_b = CUBLAS_OP_N, .m = d, .n = m, .k = h,
              .a = w_up.const_data_ptr(), .b = grad_up.const_data_ptr(), .d = grad_x.mutable_data_ptr()};
  second.accumulate = true;
  lt.gemm(second);
  return {grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up, grad_w_down, grad_b_down};
}

}  // namespace fasttx
