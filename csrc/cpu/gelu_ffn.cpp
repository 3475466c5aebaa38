// gelu_ffn on the CPU: out = act(x w1^T + b1) w2^T + b2 and its backward.
// The GEMMs are cpu/matmul.h's (MKL with transposes passed as flags, or
// oneDNN), with the biases as their accumulated C; between them run the
// elementwise passes of gelu_ffn_vec.h (but exact GELU's forward, which is
// oneDNN's: see activation_into), block of tokens by block of tokens.
// Only preact is kept for backward: act(preact) is recomputed there.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "common/activation.h"
#include "cpu/cpu_features.h"
#include "cpu/gelu_ffn_kernels.h"
#include "cpu/matmul.h"

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

// Tokens per block. A block's (rows, H) slices of act and grad_h stay in cache
// from the GEMM or pass that writes them to the GEMM that reads them, and are
// the only (., H) buffers besides preact: no 4d-per-token tensor is allocated
// (and page-faulted) afresh but preact. The weight gradients then add up over
// blocks; in bf16/fp16 that would round them once per block, so reduced
// precision runs as one block, the rounding of torch's own single GEMM.
// Blocks of fewer than 2048 rows cost GEMM speed: in the reference GPT's
// training step (2048 tokens, 384 -> 1536) blocks of 1365 rows, with the
// weight grads summed by addmm_, made the FFN's GEMMs ~20% slower than
// eager's; one block with mm_out (below) runs them as fast (MKL, 2 threads,
// AMD EPYC).
int64_t rows_per_block(int64_t m, int64_t h, at::ScalarType dtype) {
  if (at::toOpMathType(dtype) != dtype) return std::max<int64_t>(m, 1);
  constexpr int64_t kBlockBytes = int64_t(8) << 20, kMinRows = 2048;
  const int64_t rows = kBlockBytes / (std::max<int64_t>(h, 1) * int64_t(c10::elementSize(dtype))) / 64 * 64;
  return std::max<int64_t>(1, std::min(m, std::max(kMinRows, rows)));
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

// act = act(preact) into a preallocated buffer. Exact GELU goes to ATen's
// gelu_out, which hands contiguous float/bf16 tensors to oneDNN's JIT eltwise
// kernel: on a 2-core AVX-512/AMX Xeon it ran (2048, 1536) bf16 in 0.49 ms
// against 1.08 for ours (fp32 0.48 against 0.77), and the FFN forward+backward
// of the reference GPT (2048 tokens, 384 -> 1536) 8% faster in bf16. The
// backward keeps our pass (common/activation.h's derivative), which beat
// ATen's gelu_backward plus a column sum there.
void activation_into(const at::Tensor& preact, at::Tensor act, Activation kind,
                     const FfnActivationKernels* kernels) {
  if (kind == Activation::kGelu) at::gelu_out(act, preact, "none");
  else if (kernels) kernels->forward(preact, act, kind);
  else act.copy_(activation_ref(preact, kind));
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
  const FfnActivationKernels* kernels = vector_kernels();
  // Not empty_output's huge pages: on our VMs their synchronous compaction
  // stalled this GEMM-bound forward by up to 30%, more than the page faults
  // they save.
  auto preact = at::empty({m, h}, x.options());
  auto out = at::empty({m, d_out}, x.options());
  const int64_t block = rows_per_block(m, h, x.scalar_type());
  auto act = at::empty({std::min(block, m), h}, x.options());
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t n = std::min(block, m - r0);
    auto p = preact.narrow(0, r0, n), a = act.narrow(0, 0, n), o = out.narrow(0, r0, n);
    gemm_bias_out(p, x.narrow(0, r0, n), w1.t(), b1);
    activation_into(p, a, act_kind, kernels);
    gemm_bias_out(o, a, w2.t(), b2);
  }
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

  const FfnActivationKernels* kernels = vector_kernels();
  const int64_t block = rows_per_block(m, h, x.scalar_type());
  // One (rows, H) buffer per block, holding act(preact) for grad_w2 and then
  // grad_h: a second one was the largest allocation of the reference GPT's
  // training step (12 MB at 2048 tokens x 1536), for the cost of reading
  // preact twice.
  auto buffer = at::empty({std::min(block, m), h}, x.options());
  auto grad_x = at::empty({m, d}, x.options());
  auto grad_w1 = at::empty({h, d}, x.options());
  auto grad_w2 = at::empty({d_out, h}, x.options());
  auto grad_b1 = has_b1 ? at::zeros({h}, x.options()) : at::Tensor();
  auto grad_b1_block = has_b1 ? at::empty({h}, x.options()) : at::Tensor();
  auto partial = has_b1 && kernels ? at::empty({column_sum_parts(std::min(block, m)), h}, x.options().dtype(acc))
                                   : at::Tensor();
  // Blocks in row order, each summed into the weight and bias grads in turn:
  // the same order on every run. The first block writes the weight grads,
  // later ones add to them. Not zeros plus an accumulating GEMM: MKL's
  // in-place addmm_ ran these GEMMs ~40% slower than mm_out (AMD EPYC).
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t n = std::min(block, m - r0);
    auto t = buffer.narrow(0, 0, n), p = preact.narrow(0, r0, n);
    auto go = grad_out.narrow(0, r0, n), xb = x.narrow(0, r0, n), gx = grad_x.narrow(0, r0, n);
    activation_into(p, t, act_kind, kernels);  // t = act(preact)
    if (r0 == 0) linear_weight_grad_out_cpu(grad_w2, go, t);
    else gemm_out(grad_w2, go.t(), t, /*accumulate=*/true);
    gemm_out(t, go, w2);  // t = the grad of act(preact), made grad_h in place
    if (kernels) {
      kernels->backward(t, p, at::Tensor(), grad_b1_block, partial, act_kind);
    } else {
      t.copy_(activation_grad_ref(t, p, act_kind));
      if (has_b1) grad_b1_block.copy_(t.sum(0, false, acc));
    }
    if (has_b1) grad_b1.add_(grad_b1_block);
    gemm_out(grad_w1, t.t(), xb, /*accumulate=*/r0 > 0);
    gemm_out(gx, t, w1);
  }
  auto grad_b2 = has_b2 ? grad_out.sum(0, false, acc).to(x.scalar_type()) : at::Tensor();
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace fasttx
