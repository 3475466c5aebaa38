// The part of a norm kernel set that is the same for every instruction set:
// dtype dispatch and the split of rows over threads. A set supplies a Rows
// policy with
//   forward_rows<T, TX, TY>(x, res, w, b, y, s, mean, rstd, r0, r1, n, eps, rms, stream, scratch)
//   backward_part<T, TG, TL>(gy, gs, s, mean, rstd, w, gx, gx_low, dw_part, db_part, r0, r1, n, rms, stream)
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

// Calls f(T{}) for the float types a mixed-precision norm may store a tensor
// in beside float statistics: float itself, bfloat16 and half.
template <typename F>
void dispatch_float_or_low(at::ScalarType t, const char* what, const F& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "layer_norm: ", what, " must be float32, bfloat16 or float16 beside float32 "
                         "statistics, got ", t);
  }
}

// T is the statistics' storage type: s's, the parameters' and, unless mixed,
// x's and y's. Mixed (T = float only): x in TX (with a residual), y in TY.
template <class Rows>
void norm_forward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& y, const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                  double eps, bool rms) {
  const int64_t m = x.size(0), n = x.size(1);
  const at::ScalarType t = residual.defined() ? residual.scalar_type() : x.scalar_type();
  const bool stream = stream_forward_output(int64_t(x.nbytes()));
  const auto run = [&](auto t_tag, auto x_tag, auto y_tag) {
    using T = decltype(t_tag);
    using TX = decltype(x_tag);
    using TY = decltype(y_tag);
    using A = at::opmath_type<T>;
    // About 64 KB of input per task: short rows are batched, long rows split evenly.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (n * int64_t(sizeof(T))));
    at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
      std::vector<A> scratch(n);
      Rows::template forward_rows<T, TX, TY>(ptr<TX>(x), ptr<T>(residual), ptr<T>(weight), ptr<T>(bias),
                                             mut_ptr<TY>(y), mut_ptr<T>(s), mut_ptr<A>(mean), mut_ptr<A>(rstd), r0,
                                             r1, n, eps, rms, stream, scratch.data());
    });
  };
  if (x.scalar_type() == t && y.scalar_type() == t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "layer_norm_fwd_cpu",
                                    [&] { run(scalar_t{}, scalar_t{}, scalar_t{}); });
    return;
  }
  TORCH_CHECK(t == at::kFloat, "layer_norm: mixed dtypes need float32 statistics, got ", t);
  dispatch_float_or_low(x.scalar_type(), "x", [&](auto x_tag) {
    dispatch_float_or_low(y.scalar_type(), "y", [&](auto y_tag) { run(float{}, x_tag, y_tag); });
  });
}

// Mixed (s float only): grad_y in TG, and grad_input_low (when defined) in TL.
template <class Rows>
void norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_s, const at::Tensor& s, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_input,
                   const at::Tensor& grad_input_low, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                   const at::Tensor& weight_partial, const at::Tensor& bias_partial, bool rms) {
  const int64_t m = s.size(0), n = s.size(1);
  const int64_t parts = column_sum_parts(m);
  const bool stream = stream_backward_output(int64_t(s.nbytes()));
  const auto run = [&](auto t_tag, auto g_tag, auto l_tag) {
    using T = decltype(t_tag);
    using TG = decltype(g_tag);
    using TL = decltype(l_tag);
    using A = at::opmath_type<T>;
    A* dw_part = mut_ptr<A>(weight_partial);
    A* db_part = mut_ptr<A>(bias_partial);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        Rows::template backward_part<T, TG, TL>(
            ptr<TG>(grad_y), ptr<T>(grad_s), ptr<T>(s), ptr<A>(mean), ptr<A>(rstd), ptr<T>(weight),
            mut_ptr<T>(grad_input), mut_ptr<TL>(grad_input_low), dw_part ? dw_part + p * n : nullptr,
            db_part ? db_part + p * n : nullptr, m * p / parts, m * (p + 1) / parts, n, rms, stream);
      }
    });
    if (grad_weight.defined()) Rows::template sum_partials<T>(dw_part, parts, n, mut_ptr<T>(grad_weight));
    if (grad_bias.defined()) Rows::template sum_partials<T>(db_part, parts, n, mut_ptr<T>(grad_bias));
  };
  const at::ScalarType t = s.scalar_type();
  if (grad_y.scalar_type() == t && !grad_input_low.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "layer_norm_bwd_cpu",
                                    [&] { run(scalar_t{}, scalar_t{}, scalar_t{}); });
    return;
  }
  TORCH_CHECK(t == at::kFloat, "layer_norm backward: mixed dtypes need float32 s, got ", t);
  const at::ScalarType low = grad_input_low.defined() ? grad_input_low.scalar_type() : at::kFloat;
  dispatch_float_or_low(grad_y.scalar_type(), "grad_y", [&](auto g_tag) {
    dispatch_float_or_low(low, "grad_input_low", [&](auto l_tag) { run(float{}, g_tag, l_tag); });
  });
}

template <class Rows>
constexpr NormKernels kernels() {
  return NormKernels{&norm_forward<Rows>, &norm_backward<Rows>};
}

}  // namespace norm_driver
}  // namespace fasttx
