// Cross-entropy over the rows of logits (N, V) on the CPU (see csrc/ops.h):
// forward m = max(x), log_sum = log(sum exp(x - m)), loss = (m - x[target]) +
// log_sum; backward grad_x = g * (softmax(x) - onehot(target)) with
// softmax(x) = exp(x - m) / exp(log_sum). Rows whose target is ignore_index
// give loss 0 and a zero gradient. m and log_sum stay apart: their sum, the
// log-sum-exp, rounds log_sum away when the row shares a large offset (an fp32
// ulp is 8 at 1e8), while m - x[target] cancels the offset exactly.
//
// Why: eager F.cross_entropy on an LM's (tokens, vocab) logits writes
// log_softmax's (N, V) output and reads it back for the nll; its backward
// zero-fills an (N, V) gradient, scatters into it, and reads and writes it
// again in log_softmax_backward; Hugging Face's loss first copies bf16
// logits to fp32. Here the forward reads the logits once and writes two
// floats per row, and the backward reads them once and writes the gradient
// once: at GPT-2's vocabulary (50257) those passes are 412 MB each for 2048
// fp32 tokens. The row passes are softmax_kernels.h's, in fp32 for
// bf16/fp16 rows through a per-thread row buffer.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/softmax_kernels.h"

namespace fasttx {
namespace {

// Rows per parallel chunk: about ATen's grain of elements.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1)); }

template <typename T>
void cross_entropy_forward_kernel(const T* x, const int64_t* target, int64_t ignore_index, int64_t rows,
                                  int64_t vocab, at::opmath_type<T>* loss, at::opmath_type<T>* row_max,
                                  at::opmath_type<T>* log_sum) {
  using A = at::opmath_type<T>;
  const SoftmaxRowKernels<A>& kern = softmax_row_kernels<A>();
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(vocab);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * vocab;
      A max;
      if constexpr (std::is_same_v<T, A>) {
        max = kern.scale_mask_max(xr, nullptr, A(1), buf.data(), vocab);  // copies the row into buf
      } else {
        for (int64_t j = 0; j < vocab; ++j) buf[j] = A(xr[j]);
        max = kern.scale_mask_max(buf.data(), nullptr, A(1), buf.data(), vocab);
      }
      row_max[r] = max;
      log_sum[r] = std::log(kern.exp_sum(buf.data(), max, buf.data(), vocab));
      const int64_t t = target[r];
      TORCH_CHECK(t == ignore_index || (t >= 0 && t < vocab), "cross_entropy: target[", r, "] = ", t,
                  " is not a class index in [0, ", vocab, ") nor ignore_index (", ignore_index, ")");
      loss[r] = t == ignore_index ? A(0) : (max - A(xr[t])) + log_sum[r];
    }
  });
}

template <typename T>
void cross_entropy_backward_kernel(const at::opmath_type<T>* grad_rows, const T* x, const int64_t* target,
                                   const at::opmath_type<T>* row_max, const at::opmath_type<T>* log_sum,
                                   int64_t ignore_index, int64_t rows, int64_t vocab, T* grad_x) {
  using A = at::opmath_type<T>;
  constexpr bool kConvert = !std::is_same_v<T, A>;
  const SoftmaxRowKernels<A>& kern = softmax_row_kernels<A>();
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(kConvert ? vocab : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * vocab;
      T* gr = grad_x + r * vocab;
      const int64_t t = target[r];
      if (t == ignore_index) {
        // 0, except in a row holding NaN or +inf (its max + log_sum is NaN or +inf):
        // torch's log_softmax backward gives 0 * exp(NaN) = NaN there, and so do we.
        const A lse = row_max[r] + log_sum[r];
        const bool poisoned = std::isnan(lse) || lse == std::numeric_limits<A>::infinity();
        std::fill(gr, gr + vocab, poisoned ? std::numeric_limits<T>::quiet_NaN() : T(0));
        continue;
      }
      TORCH_CHECK(t >= 0 && t < vocab, "cross_entropy: target[", r, "] = ", t, " is not a class index in [0, ",
                  vocab, ") nor ignore_index (", ignore_index, ")");
      A* p = nullptr;
      if constexpr (kConvert) {
        p = buf.data();
        for (int64_t j = 0; j < vocab; ++j) p[j] = A(xr[j]);
        kern.exp_sum(p, row_max[r], p, vocab);
      } else {
        p = gr;  // fp32 (fp64) rows are computed in place in the output
        kern.exp_sum(xr, row_max[r], p, vocab);
      }
      const A g = grad_rows[r];
      kern.scale(p, g * std::exp(-log_sum[r]), vocab);
      p[t] -= g;
      if constexpr (kConvert) {
        for (int64_t j = 0; j < vocab; ++j) gr[j] = T(p[j]);
      }
    }
  });
}

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous (N, V) tensor, got ",
              logits.sizes(), " with strides ", logits.strides());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one class, got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.is_contiguous() &&
                  target.scalar_type() == at::kLong,
              op, ": target must be a contiguous int64 (", logits.size(0), ",) tensor, got ", target.scalar_type(),
              " ", target.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits,
                                                                     const at::Tensor& target, int64_t ignore_index) {
  const char* op = "cross_entropy_fwd_cpu";
  check_inputs(op, logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  auto loss = at::empty({rows}, logits.options().dtype(acc));
  auto row_max = at::empty({rows}, logits.options().dtype(acc));
  auto log_sum = at::empty({rows}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    cross_entropy_forward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), ignore_index,
                                           rows, vocab, loss.data_ptr<A>(), row_max.data_ptr<A>(),
                                           log_sum.data_ptr<A>());
  });
  return {loss, row_max, log_sum};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& row_max, const at::Tensor& log_sum, int64_t ignore_index) {
  const char* op = "cross_entropy_bwd_cpu";
  check_inputs(op, logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  for (const at::Tensor* t : {&grad_rows, &row_max, &log_sum}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->is_contiguous() && t->scalar_type() == acc, op,
                ": grad_rows, row_max and log_sum must be contiguous ", acc, " (", rows, ",) tensors, got ",
                t->scalar_type(), " ", t->sizes());
  }
  auto grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    cross_entropy_backward_kernel<scalar_t>(grad_rows.data_ptr<A>(), logits.data_ptr<scalar_t>(),
                                            target.data_ptr<int64_t>(), row_max.data_ptr<A>(), log_sum.data_ptr<A>(),
                                            ignore_index, rows, vocab, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace fasttx
