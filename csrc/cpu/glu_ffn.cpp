// glu_ffn on the CPU: out = (act(x w_gate^T + b_gate) * (x w_up^T + b_up)) w_down^T + b_down
// and its backward. The GEMMs are cpu/matmul.h's (as gelu_ffn's: MKL or
// oneDNN, biases as the GEMM's accumulated C); between them run glu_vec.h's
// passes. Kept for backward: x, gate and up, never act(gate) * up, which the
// backward's one glu pass recomputes next to both gradients.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "cpu/glu_kernels.h"
#include "cpu/matmul.h"

namespace fasttx {

// glu.cpp's.
Activation check_glu_activation(const char* op, int64_t activation);
at::Tensor glu_activation_ref(const at::Tensor& z, Activation activation);
void glu_backward_into(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor& grad_gate, const at::Tensor& grad_up, const at::Tensor& prod,
                       Activation activation);

namespace {

void check_matrix(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.is_contiguous(), op, ": ", name,
              " must be a contiguous (", rows, ", ", cols, ") tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " must match x dtype ",
              x.scalar_type());
}

void check_bias(const char* op, const char* name, const std::optional<at::Tensor>& b, const at::Tensor& x,
                int64_t size) {
  if (!b) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == size && b->is_contiguous(), op, ": ", name,
              " must be a contiguous (", size, ",) tensor, got shape ", b->sizes());
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", b->scalar_type(),
              " must match x dtype ", x.scalar_type());
}

void check_weights(const char* op, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                   const at::Tensor& w_down) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ", x.sizes());
  TORCH_CHECK(w_gate.dim() == 2 && w_down.dim() == 2, op, ": w_gate and w_down must be 2-D, got shapes ",
              w_gate.sizes(), " and ", w_down.sizes());
  const int64_t d = x.size(1), h = w_gate.size(0);
  check_matrix(op, "w_gate", w_gate, x, h, d);
  check_matrix(op, "w_up", w_up, x, h, d);
  check_matrix(op, "w_down", w_down, x, w_down.size(0), h);
}

at::Tensor column_sum(const at::Tensor& t) {
  return t.sum(0, false, at::toOpMathType(t.scalar_type())).to(t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_ffn_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_gate, const std::optional<at::Tensor>& b_gate, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    int64_t activation) {
  const char* op = "glu_ffn_fwd_cpu";
  check_weights(op, x, w_gate, w_up, w_down);
  const int64_t m = x.size(0), h = w_gate.size(0), d_out = w_down.size(0);
  check_bias(op, "b_gate", b_gate, x, h);
  check_bias(op, "b_up", b_up, x, h);
  check_bias(op, "b_down", b_down, x, d_out);
  const Activation act = check_glu_activation(op, activation);
  auto gate = at::empty({m, h}, x.options()), up = at::empty({m, h}, x.options());
  gemm_bias_out(gate, x, w_gate.t(), b_gate);
  gemm_bias_out(up, x, w_up.t(), b_up);
  at::Tensor prod;
  if (const GluKernels* kernels = glu_vector_kernels()) {
    prod = at::empty({m, h}, x.options());
    kernels->forward(gate, up, prod, act);
  } else {
    const auto acc = at::toOpMathType(x.scalar_type());
    prod = (glu_activation_ref(gate.to(acc), act) * up.to(acc)).to(x.scalar_type());
  }
  auto out = at::empty({m, d_out}, x.options());
  gemm_bias_out(out, prod, w_down.t(), b_down);
  return {out, gate, up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> glu_ffn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down, bool has_b_gate, bool has_b_up,
    bool has_b_down, int64_t activation) {
  const char* op = "glu_ffn_bwd_cpu";
  check_weights(op, x, w_gate, w_up, w_down);
  const int64_t m = x.size(0), d = x.size(1), h = w_gate.size(0), d_out = w_down.size(0);
  check_matrix(op, "gate", gate, x, m, h);
  check_matrix(op, "up", up, x, m, h);
  check_matrix(op, "grad_out", grad_out, x, m, d_out);
  const Activation act = check_glu_activation(op, activation);

  // grad_prod = grad_out w_down, then one pass: grad_gate in its place, grad_up, and the product
  // act(gate) * up for grad_w_down, recomputed rather than kept from the forward.
  auto grad_gate = at::empty({m, h}, x.options());
  gemm_out(grad_gate, grad_out, w_down);
  auto grad_up = at::empty({m, h}, x.options());
  auto grad_w_down = at::empty({d_out, h}, x.options());
  {
    auto prod = at::empty({m, h}, x.options());
    glu_backward_into(grad_gate, gate, up, grad_gate, grad_up, prod, act);
    linear_weight_grad_out_cpu(grad_w_down, grad_out, prod);
  }
  auto grad_w_gate = at::empty({h, d}, x.options()), grad_w_up = at::empty({h, d}, x.options());
  linear_weight_grad_out_cpu(grad_w_gate, grad_gate, x);
  linear_weight_grad_out_cpu(grad_w_up, grad_up, x);
  auto grad_x = at::empty({m, d}, x.options());
  gemm_out(grad_x, grad_gate, w_gate);
  gemm_out(grad_x, grad_up, w_up, /*accumulate=*/true);
  return {grad_x,
          grad_w_gate,
          has_b_gate ? column_sum(grad_gate) : at::Tensor(),
          grad_w_up,
          has_b_up ? column_sum(grad_up) : at::Tensor(),
          grad_w_down,
          has_b_down ? column_sum(grad_out) : at::Tensor()};
}

}  // namespace fasttx
