// The part of a norm kernel set that is the same for every instruction set:
// dtype dispatch and the split of rows over threads. A set supplies a Rows
// policy with
//   forward_rows<T>(x, res, w, b, y, s, mean, rstd, r0, r1, n, eps, rms, stream, scratch)
//   backward_part<T>(gy, gs, s, mean, rstd, w, gx, dw_part, db_part, r0, r1, n, rms, stream)
//   sum_partials<T>(partial, parts, n, out)
// (pointers null where a tensor is absent; scratch holds n opmath values) and
// gets its NormKernels entry points from norm_forward / norm_backward.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/layer_norm_kernels.h"

namespace fasttx {
namespace norm_driver {

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <class Rows>
void norm_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& y, const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                  double eps, bool rms) {
  const int64_t m = x.size(0), n = x.size(1);
  const bool stream = stream_forward_output(int64_t(x.nbytes()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    // About 64 KB of input per task: short rows are batched, long rows split evenly.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (n * int64_t(sizeof(scalar_t))));
    at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
      std::vector<A> scratch(n);
      Rows::template forward_rows<scalar_t>(
          ptr<scalar_t>(x), ptr<scalar_t>(residual), ptr<scalar_t>(weight), ptr<scalar_t>(bias),
          mut_ptr<scalar_t>(y), mut_ptr<scalar_t>(s), mut_ptr<A>(mean), mut_ptr<A>(rstd), r0, r1, n, eps, rms, stream,
          scratch.data());
    });
  });
}

template <class Rows>
void norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_s, const at::Tensor& s, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_input,
                   const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& weight_partial,
                   const at::Tensor& bias_partial, bool rms) {
  const int64_t m = s.size(0), n = s.size(1);
  const int64_t parts = column_sum_parts(m);
  const bool stream = stream_backward_output(int64_t(s.nbytes()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    A* dw_part = mut_ptr<A>(weight_partial);
    A* db_part = mut_ptr<A>(bias_partial);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        Rows::template backward_part<scalar_t>(
            ptr<scalar_t>(grad_y), ptr<scalar_t>(grad_s), ptr<scalar_t>(s), ptr<A>(mean), ptr<A>(rstd),
            ptr<scalar_t>(weight), mut_ptr<scalar_t>(grad_input), dw_part ? dw_part + p * n : nullptr,
            db_part ? db_part + p * n : nullptr, m * p / parts, m * (p + 1) / parts, n, rms, stream);
      }
    });
    if (grad_weight.defined()) Rows::template sum_partials<scalar_t>(dw_part, parts, n, mut_ptr<scalar_t>(grad_weight));
    if (grad_bias.defined()) Rows::template sum_partials<scalar_t>(db_part, parts, n, mut_ptr<scalar_t>(grad_bias));
  });
}

template <class Rows>
constexpr NormKernels kernels() {
  return NormKernels{&norm_forward<Rows>, &norm_backward<Rows>};
}

}  // namespace norm_driver
}  // namespace fasttx
