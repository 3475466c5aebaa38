// gelu_ffn on the CPU: out = act(x w1^T + b1) w2^T + b2 and its backward.
// The GEMMs are ATen's (MKL/oneDNN BLAS, transposes passed as flags, never
// copied), with the biases as their beta term; between them run the
// elementwise passes of gelu_ffn_vec.h. Only preact is kept for backward:
// act(preact) is recomputed there.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "common/activation.h"
#include "cpu/cpu_features.h"
#include "cpu/gelu_ffn_kernels.h"

namespace fasttx {
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

Activation check_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2, op, ": activation must be 0 (gelu), 1 (gelu_tanh) or 2 (relu), got ",
              activation);
  return static_cast<Activation>(activation);
}

// Row chunks of grad_b1's partial sums: a function of M alone (determinism).
int64_t bias_grad_chunks(int64_t m) {
  constexpr int64_t kMaxChunks = 64, kMinChunkRows = 16;
  return std::max<int64_t>(1, std::min(kMaxChunks, m / kMinChunkRows));
}

// Null where this CPU has no vector kernels: ATen's own then run the passes.
const FfnActivationKernels* vector_kernels() {
  switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
    case CpuIsa::kAvx512: return &avx512::gelu_ffn;
    case CpuIsa::kAvx2: return &avx2::gelu_ffn;
#endif
    default: return nullptr;
  }
}

at::Tensor activation_ref(const at::Tensor& z, Activation activation) {
  if (activation == Activation::kRelu) return at::relu(z);
  return at::gelu(z, activation == Activation::kGeluTanh ? "tanh" : "none");
}

at::Tensor activation_grad_ref(const at::Tensor& grad, const at::Tensor& z, Activation activation) {
  if (activation == Activation::kRelu) return at::threshold_backward(grad, z, 0);
  return at::gelu_backward(grad, z, activation == Activation::kGeluTanh ? "tanh" : "none");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2, int64_t activation) {
  const char* op = "gelu_ffn_fwd_cpu";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ", x.sizes());
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be 2-D (hidden, d_model), got shape ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2, op, ": w2 must be 2-D (d_out, hidden), got shape ", w2.sizes());
  const int64_t m = x.size(0), d = x.size(1), h = w1.size(0), d_out = w2.size(0);
  check_matrix(op, "w1", w1, x, h, d);
  check_matrix(op, "w2", w2, x, d_out, h);
  check_bias(op, "b1", b1, x, h);
  check_bias(op, "b2", b2, x, d_out);
  const Activation act_kind = check_activation(op, activation);

  // b1 goes in as the GEMM's beta term, so that bf16 preact is rounded once,
  // as in torch's addmm: rounding x w1^T first and then adding b1 flips the
  // sign of small pre-activations, which is all ReLU's gradient looks at.
  auto preact = empty_output({m, h}, x.options());
  if (b1) at::addmm_out(preact, *b1, x, w1.t());
  else at::mm_out(preact, x, w1.t());
  at::Tensor act;
  if (const FfnActivationKernels* kernels = vector_kernels()) {
    act = empty_output({m, h}, x.options());
    kernels->forward(preact, act, act_kind);
  } else {
    act = activation_ref(preact, act_kind);
  }
  auto out = b2 ? at::addmm(*b2, act, w2.t()) : at::mm(act, w2.t());
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact, const at::Tensor& w1,
    const at::Tensor& w2, bool has_b1, bool has_b2, int64_t activation) {
  const char* op = "gelu_ffn_bwd_cpu";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D tensor, got shape ", x.sizes());
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2, op, ": w1 and w2 must be 2-D, got shapes ", w1.sizes(), " and ",
              w2.sizes());
  const int64_t m = x.size(0), d = x.size(1), h = w1.size(0), d_out = w2.size(0);
  check_matrix(op, "w1", w1, x, h, d);
  check_matrix(op, "w2", w2, x, d_out, h);
  check_matrix(op, "preact", preact, x, m, h);
  check_matrix(op, "grad_out", grad_out, x, m, d_out);
  const Activation act_kind = check_activation(op, activation);
  const auto acc = at::toOpMathType(x.scalar_type());

  auto grad_h = empty_output({m, h}, x.options());
  at::mm_out(grad_h, grad_out, w2);  // grad of act(preact), made grad_h in place below
  at::Tensor act, grad_b1;
  if (const FfnActivationKernels* kernels = vector_kernels()) {
    act = empty_output({m, h}, x.options());
    at::Tensor partial;
    if (has_b1) {
      grad_b1 = at::empty({h}, x.options());
      partial = at::empty({bias_grad_chunks(m), h}, x.options().dtype(acc));
    }
    kernels->backward(grad_h, preact, act, grad_b1, partial, act_kind);
  } else {
    grad_h = activation_grad_ref(grad_h, preact, act_kind);
    act = activation_ref(preact, act_kind);
    if (has_b1) grad_b1 = grad_h.sum(0, false, acc).to(x.scalar_type());
  }
  auto grad_w2 = at::mm(grad_out.t(), act);
  act.reset();  // 4d values per token: let the allocator have them back before the next GEMMs
  auto grad_w1 = at::mm(grad_h.t(), x);
  auto grad_x = at::mm(grad_h, w1);
  auto grad_b2 = has_b2 ? grad_out.sum(0, false, acc).to(x.scalar_type()) : at::Tensor();
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace fasttx
