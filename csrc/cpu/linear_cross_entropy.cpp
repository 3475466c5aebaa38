// linear_cross_entropy's row kernel on the CPU (contract: csrc/ops.h), and the
// GEMM its chunk loop calls (fasttx/ops/linear_cross_entropy.py).
//
// For each row x of a chunk's logits (C, V), z = softcap(x) = c tanh(x / c)
// (z = x without softcap), m = max z, log_sum = log sum exp(z - m):
//   loss = (1 - eps)(m - z_t) + eps / V * sum_j (m - z_j) + log_sum
// (0 for an ignored row), never lse - z_t: m and log_sum stay apart so that a
// large shared offset cancels exactly, as in cross_entropy.cpp. With
// grad_rows, the row is overwritten in place by its gradient
//   g_n * (softmax(z) - (1 - eps) onehot(t) - eps / V) * (1 - (z / c)^2).
// The row goes once into an opmath buffer (softcap applied), the max and
// sum-of-exp passes run on that L2-resident buffer, and one more pass writes
// the gradient. This file keeps the portable loops (fp64, CPUs below AVX2);
// linear_cross_entropy_vec.h has the vectorized ones.
//
// Rows are independent and each is reduced in a fixed order: results do not
// depend on the thread count.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/linear_cross_entropy_kernels.h"
#include "cpu/matmul.h"
#include "cpu/softmax_kernels.h"

namespace fasttx {
namespace {

const LinearCrossEntropyRowKernels* vector_row_kernels() {
  switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
    case CpuIsa::kAvx512: return &avx512::linear_cross_entropy_rows;
    case CpuIsa::kAvx2: return &avx2::linear_cross_entropy_rows;
#endif
    default: return nullptr;
  }
}

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1)); }

template <typename T>
void lce_rows_kernel(T* x, const int64_t* target, const at::opmath_type<T>* grad_rows, int64_t ignore_index,
                     at::opmath_type<T> eps, at::opmath_type<T> cap, int64_t rows, int64_t vocab,
                     at::opmath_type<T>* loss, at::opmath_type<T>* lse) {
  using A = at::opmath_type<T>;
  const SoftmaxRowKernels<A>& kern = softmax_row_kernels<A>();
  const bool softcap = cap > A(0);
  const A inv_cap = softcap ? A(1) / cap : A(0);
  const A smooth = eps / A(vocab);
  at::parallel_for(0, rows, row_grain(vocab), [&](int64_t r0, int64_t r1) {
    std::vector<A> z(vocab), e(vocab);
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * vocab;
      const int64_t t = target[r];
      TORCH_CHECK(t == ignore_index || (t >= 0 && t < vocab), "linear_cross_entropy: target[", r, "] = ", t,
                  " is not a class index in [0, ", vocab, ") nor ignore_index (", ignore_index, ")");
      A max;
      if (!softcap && std::is_same_v<T, A>) {
        max = kern.scale_mask_max(reinterpret_cast<const A*>(xr), nullptr, A(1), z.data(), vocab);
      } else {
        for (int64_t j = 0; j < vocab; ++j) {
          const A v = A(xr[j]);
          z[j] = softcap ? cap * std::tanh(v * inv_cap) : v;
        }
        max = kern.scale_mask_max(z.data(), nullptr, A(1), z.data(), vocab);
      }
      const A sum = kern.exp_sum(z.data(), max, e.data(), vocab);
      const A log_sum = std::log(sum);
      lse[r] = max + log_sum;
      const bool ignored = t == ignore_index;
      A row_loss = A(0);
      if (!ignored) {
        row_loss = (A(1) - eps) * (max - z[t]) + log_sum;
        if (eps != A(0)) {
          A s = A(0);
          for (int64_t j = 0; j < vocab; ++j) s += max - z[j];
          row_loss += smooth * s;
        }
      }
      loss[r] = row_loss;
      if (grad_rows == nullptr) continue;
      if (ignored) {
        std::fill(xr, xr + vocab, T(0));
        continue;
      }
      const A g = grad_rows[r];
      const A p_scale = g / sum;
      const A shift = g * smooth;
      for (int64_t j = 0; j < vocab; ++j) {
        A d = e[j] * p_scale - shift;
        if (j == t) d -= g * (A(1) - eps);
        if (softcap) {
          const A u = z[j] * inv_cap;
          d *= A(1) - u * u;
        }
        xr[j] = T(d);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_rows_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                 const std::optional<at::Tensor>& grad_rows,
                                                                 int64_t ignore_index, double label_smoothing,
                                                                 double softcap) {
  const char* op = "linear_cross_entropy_rows_cpu";
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(), op,
              ": logits must be a contiguous CPU (C, V) tensor, got ", logits.sizes(), " with strides ",
              logits.strides());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one class, got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.is_contiguous() &&
                  target.scalar_type() == at::kLong,
              op, ": target must be a contiguous int64 (", logits.size(0), ",) tensor, got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be > 0 (0: none), got ", softcap);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  if (grad_rows) {
    TORCH_CHECK(grad_rows->dim() == 1 && grad_rows->size(0) == rows && grad_rows->is_contiguous() &&
                    grad_rows->scalar_type() == acc,
                op, ": grad_rows must be a contiguous ", acc, " (", rows, ",) tensor, got ", grad_rows->scalar_type(),
                " ", grad_rows->sizes());
  }
  auto loss = at::empty({rows}, logits.options().dtype(acc));
  auto lse = at::empty({rows}, logits.options().dtype(acc));
  const LinearCrossEntropyRowKernels* vec = vector_row_kernels();
  if (vec && acc == at::kFloat) {
    vec->rows(logits, target.data_ptr<int64_t>(), grad_rows ? grad_rows->data_ptr<float>() : nullptr, ignore_index,
              float(label_smoothing), float(softcap), loss.data_ptr<float>(), lse.data_ptr<float>());
    return {loss, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "linear_cross_entropy_rows_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    lce_rows_kernel<scalar_t>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(),
                              grad_rows ? grad_rows->data_ptr<A>() : nullptr, ignore_index, A(label_smoothing),
                              A(softcap), rows, vocab, loss.data_ptr<A>(), lse.data_ptr<A>());
  });
  return {loss, lse};
}

void linear_cross_entropy_gemm_cpu(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(0) == out.size(0) &&
                  b.size(1) == out.size(1) && a.size(1) == b.size(0),
              "linear_cross_entropy_gemm_cpu: out ", out.sizes(), " = a ", a.sizes(), " @ b ", b.sizes(),
              " does not fit, or out is not contiguous");
  TORCH_CHECK(out.scalar_type() == a.scalar_type() && a.scalar_type() == b.scalar_type(),
              "linear_cross_entropy_gemm_cpu: out, a and b must share a dtype, got ", out.scalar_type(), ", ",
              a.scalar_type(), ", ", b.scalar_type());
  gemm_out(out, a, b, accumulate);
}

}  // namespace fasttx
