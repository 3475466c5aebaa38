// bias + GELU on the CPU: y = gelu(x + bias), and its backward. This file
// checks, allocates and picks the kernels for this CPU; they live in
// bias_gelu_vec.h, compiled per ISA.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "cpu/bias_gelu_kernels.h"
#include "cpu/cpu_features.h"

namespace fasttx {
namespace {

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ",
              x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.size(0) == x.size(1), op,
              ": bias must be a contiguous 1-D tensor of size ", x.size(1), ", got shape ", bias.sizes());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), op, ": bias dtype ", bias.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(approximate == 0 || approximate == 1, op, ": approximate must be 0 (erf) or 1 (tanh), got ",
              approximate);
}

const char* approx_name(int64_t approximate) { return approximate == 1 ? "tanh" : "none"; }

// The vector kernels for this CPU; null where there are none (ATen's own
// kernels, vectorized for this CPU, then beat scalar loops of ours).
const BiasGeluKernels* vector_kernels() {
  switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
    case CpuIsa::kAvx512: return &avx512::bias_gelu;
    case CpuIsa::kAvx2: return &avx2::bias_gelu;
#endif
    default: return nullptr;
  }
}

}  // namespace

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  check_inputs("bias_gelu_fwd_cpu", x, bias, approximate);
  const BiasGeluKernels* kernels = vector_kernels();
  if (!kernels) return at::gelu(x + bias, approx_name(approximate));
  auto y = empty_output(x);
  kernels->forward(x, bias, y, static_cast<GeluApprox>(approximate));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& bias, int64_t approximate) {
  check_inputs("bias_gelu_bwd_cpu", x, bias, approximate);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "bias_gelu_bwd_cpu: grad must be contiguous with the shape and dtype of x, got shape ", grad.sizes(),
              " and dtype ", grad.scalar_type());
  const auto acc = at::toOpMathType(x.scalar_type());
  const BiasGeluKernels* kernels = vector_kernels();
  if (!kernels) {
    auto dx = at::gelu_backward(grad.to(acc), (x + bias).to(acc), approx_name(approximate));
    return {dx.to(x.scalar_type()), dx.sum(0).to(bias.scalar_type())};
  }
  auto dx = empty_output(x);
  auto db = at::empty_like(bias);
  auto partial = at::empty({column_sum_parts(x.size(0)), x.size(1)}, x.options().dtype(acc));
  kernels->backward(grad, x, bias, dx, db, partial, static_cast<GeluApprox>(approximate));
  return {dx, db};
}

}  // namespace fasttx
