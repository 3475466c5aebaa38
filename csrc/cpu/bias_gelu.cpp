// bias + GELU on the CPU: y = gelu(x + bias), and its backward.
// (First version: fp32/fp64 through at::vec, reduced precision through float.)
#include "common/gelu.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace fasttx {
namespace {

template <typename T>
struct VecMath {
  using V = at::vec::Vectorized<T>;
  static V erf(V x) { return x.erf(); }
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
};

template <typename T>
void fwd_rows(const T* x, const T* b, T* y, int64_t row_begin, int64_t row_end, int64_t n, GeluApprox a) {
  using V = at::vec::Vectorized<T>;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    int64_t j = 0;
    for (; j + V::size() <= n; j += V::size()) {
      V v = V::loadu(xr + j) + V::loadu(b + j);
      gelu::forward<VecMath<T>>(v, a).store(yr + j);
    }
    for (; j < n; ++j) yr[j] = gelu::forward<ScalarMath>(xr[j] + b[j], a);
  }
}

}  // namespace

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias, int64_t approximate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bias_gelu_fwd_cpu: x must be a contiguous 2-D tensor");
  auto y = at::empty_like(x);
  const int64_t m = x.size(0), n = x.size(1);
  auto a = static_cast<GeluApprox>(approximate);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* bp = bias.data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t b0, int64_t b1) { fwd_rows(xp, bp, yp, b0, b1, n, a); });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& bias, int64_t approximate) {
  auto a = static_cast<GeluApprox>(approximate);
  auto z = x + bias;
  auto dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    const auto* zp = z.data_ptr<scalar_t>();
    const auto* gp = grad.data_ptr<scalar_t>();
    auto* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dp[i] = gp[i] * gelu::grad<ScalarMath>(zp[i], a);
    });
  });
  return {dx, dx.sum(0)};
}

}  // namespace fasttx
