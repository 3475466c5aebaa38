// linear on the CPU: out = x w^T + b and its backward, nn.Linear's layout,
// on cpu/matmul.h's GEMMs. It exists for those GEMMs alone: fasttx.ops.linear
// calls it only where they are not ATen's own (fp32 on oneDNN), and is
// F.linear everywhere else.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "cpu/matmul.h"

namespace fasttx {
namespace {

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (tokens, in_features), got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), op, ": weight must have shape (out_features, ", x.size(1),
              ") to match x ", x.sizes(), ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op, ": weight (",
              w.scalar_type(), ", ", w.device(), ") must match x (", x.scalar_type(), ", ", x.device(), ")");
}

}  // namespace

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const char* op = "linear_fwd_cpu";
  check_linear(op, x, w);
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->scalar_type() == x.scalar_type(), op,
                ": bias must be (", w.size(0), ",) of x's dtype ", x.scalar_type(), ", got ", b->sizes(), " ",
                b->scalar_type());
  }
  auto out = at::empty({x.size(0), w.size(0)}, x.options());
  return gemm_bias_out(out, x, w.t(), b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& w, bool needs_grad_x,
                                                              bool needs_grad_w, bool has_bias) {
  const char* op = "linear_bwd_cpu";
  check_linear(op, x, w);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == w.size(0), op,
              ": grad_out must have shape (", x.size(0), ", ", w.size(0), "), got ", grad_out.sizes());
  at::Tensor grad_x;
  if (needs_grad_x) {
    grad_x = at::empty(x.sizes(), x.options());
    gemm_out(grad_x, grad_out, w);
  }
  at::Tensor grad_w;
  if (needs_grad_w) {
    grad_w = at::empty(w.sizes(), w.options());
    linear_weight_grad_out_cpu(grad_w, grad_out, x);
  }
  auto grad_b = has_bias ? grad_out.sum(0, false, at::toOpMathType(x.scalar_type())).to(x.scalar_type())
                         : at::Tensor();
  return {grad_x, grad_w, grad_b};
}

}  // namespace fasttx
