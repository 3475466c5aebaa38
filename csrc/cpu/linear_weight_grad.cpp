// A linear's weight gradient on the CPU, grad_w = grad_out^T x, for gelu_ffn's
// backward and fasttx.nn's linears.
//
// Why not at::mm(grad_out.t(), x) alone: in bf16, oneDNN runs that
// transposed-A product (the tokens as the reduction) at 1.0-1.5 TFLOP/s on 2
// cores of an AMX Xeon at the reference GPT's shapes (2048 tokens, 384 <->
// 1536). Where x is at least twice as wide as grad_out (an FFN's down
// projection: grad_out (2048, 384), x (2048, 1536)), transposing grad_out in
// AVX-512 registers first and multiplying row-major operands took 1.30 ms
// against 2.19. Where grad_out is as wide as x or wider, the transpose cost
// more than it saved (1152 x 384: 1.40 against 1.38 ms; 1536 x 384: 1.84
// against 1.47), so those, and fp32 (MKL and oneDNN run the transposed
// product as fast as any), go straight to cpu/matmul.h's gemm_out.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/block_gemm.h"
#include "cpu/matmul.h"

namespace fasttx {
namespace {

bool transposes_first(const at::Tensor& grad_out, const at::Tensor& x) {
  return grad_out.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && grad_out.dim() == 2 &&
         grad_out.is_contiguous() && grad_out.size(1) % 2 == 0 && grad_out.size(0) > 0 &&
         2 * grad_out.size(1) <= x.size(1) && bf16_transpose_available();
}

// grad_out^T, (O, M), row-major: rows of grad_out in blocks of 64 per task.
at::Tensor transposed(const at::Tensor& grad_out) {
  const int64_t m = grad_out.size(0), o = grad_out.size(1);
  auto t = at::empty({o, m}, grad_out.options());
  const auto* src = grad_out.const_data_ptr<c10::BFloat16>();
  auto* dst = t.mutable_data_ptr<c10::BFloat16>();
  at::parallel_for(0, (m + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * 64, r1 = std::min(m, b1 * 64);
    transpose_bf16(src + r0 * o, r1 - r0, o, o, dst + r0, m);
  });
  return t;
}

}  // namespace

at::Tensor& linear_weight_grad_out_cpu(at::Tensor& out, const at::Tensor& grad_out, const at::Tensor& x) {
  if (transposes_first(grad_out, x)) return at::mm_out(out, transposed(grad_out), x);
  return gemm_out(out, grad_out.t(), x);
}

at::Tensor linear_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0),
              "linear_weight_grad_cpu: grad_out (M, O) and x (M, I) must be 2-D with the same M, got ",
              grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "linear_weight_grad_cpu: grad_out dtype ",
              grad_out.scalar_type(), " must match x dtype ", x.scalar_type());
  auto out = at::empty({grad_out.size(1), x.size(1)}, x.options());
  return linear_weight_grad_out_cpu(out, grad_out, x);
}

}  // namespace fasttx
