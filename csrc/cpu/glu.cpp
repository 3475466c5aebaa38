// glu on the CPU: y = act(gate) * up, and its backward. This file checks,
// allocates and picks the kernels for this CPU; they live in glu_vec.h,
// compiled per ISA.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "cpu/cpu_features.h"
#include "cpu/glu_kernels.h"

namespace fasttx {

const GluKernels* glu_vector_kernels() {
  switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
    case CpuIsa::kAvx512: return &avx512::glu;
    case CpuIsa::kAvx2: return &avx2::glu;
#endif
    default: return nullptr;
  }
}

Activation check_glu_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation == 0 || activation == 1 || activation == 3, op,
              ": activation must be 0 (gelu), 1 (gelu_tanh) or 3 (silu), got ", activation);
  return static_cast<Activation>(activation);
}

// ATen's version of the passes, where this CPU has no vector kernels of ours.
at::Tensor glu_activation_ref(const at::Tensor& z, Activation activation) {
  if (activation == Activation::kSilu) return at::silu(z);
  return at::gelu(z, activation == Activation::kGeluTanh ? "tanh" : "none");
}

at::Tensor glu_activation_grad_ref(const at::Tensor& grad, const at::Tensor& z, Activation activation) {
  if (activation == Activation::kSilu) return at::silu_backward(grad, z);
  return at::gelu_backward(grad, z, activation == Activation::kGeluTanh ? "tanh" : "none");
}

void glu_backward_into(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                       const at::Tensor& grad_gate, const at::Tensor& grad_up, const at::Tensor& prod,
                       Activation activation) {
  if (const GluKernels* kernels = glu_vector_kernels()) {
    kernels->backward(grad, gate, up, grad_gate, grad_up, prod, activation);
    return;
  }
  const auto acc = at::toOpMathType(gate.scalar_type());
  const auto g = grad.to(acc), z = gate.to(acc), u = up.to(acc);
  const auto a = glu_activation_ref(z, activation);
  grad_up.copy_(g * a);
  if (prod.defined()) prod.copy_(a * u);
  grad_gate.copy_(glu_activation_grad_ref(g * u, z, activation));
}

namespace {

void check_pair(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), op, ": gate and up must be contiguous");
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate and up must have one shape, got ", gate.sizes(), " and ",
              up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), op, ": up dtype ", up.scalar_type(), " must match gate dtype ",
              gate.scalar_type());
}

}  // namespace

at::Tensor glu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, int64_t activation) {
  check_pair("glu_fwd_cpu", gate, up);
  const Activation act = check_glu_activation("glu_fwd_cpu", activation);
  const GluKernels* kernels = glu_vector_kernels();
  if (!kernels) {
    const auto acc = at::toOpMathType(gate.scalar_type());
    return (glu_activation_ref(gate.to(acc), act) * up.to(acc)).to(gate.scalar_type());
  }
  auto y = empty_output(gate);
  kernels->forward(gate, up, y, act);
  return y;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cpu(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                               int64_t activation) {
  check_pair("glu_bwd_cpu", gate, up);
  check_pair("glu_bwd_cpu", gate, grad);
  const Activation act = check_glu_activation("glu_bwd_cpu", activation);
  auto grad_gate = empty_output(gate), grad_up = empty_output(gate);
  glu_backward_into(grad, gate, up, grad_gate, grad_up, at::Tensor(), act);
  return {grad_gate, grad_up};
}

}  // namespace fasttx
