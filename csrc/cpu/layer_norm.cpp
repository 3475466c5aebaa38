// Row normalization on the CPU: layer_norm, add_layer_norm and rms_norm,
// forward and backward, one kernel family (see csrc/ops.h for the contract).
//
// Memory is the limit (a few flops per byte), so each kernel reads its inputs
// and writes its outputs once: a row is read from memory once and its later
// passes (statistics, then normalization) hit L1/L2. Statistics come from
// exact per-chunk moments merged with Chan's formula (csrc/common/welford.h):
// accurate when |mean| >> std. dweight/dbias are summed through fp32 partial
// rows of fixed row ranges, so the backward is bitwise reproducible.
//
// This file holds the entry points (checks, allocation, the choice of kernel
// set for this CPU) and the portable kernels; the vector kernels are in
// layer_norm_vec.h (see cpu/layer_norm_kernels.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/welford.h"
#include "cpu/cpu_features.h"
#include "cpu/layer_norm_driver.h"
#include "cpu/layer_norm_kernels.h"
#include "ops.h"

namespace fasttx {
namespace {

constexpr int64_t kChunk = 256;  // elements per exact-moment chunk

// Exact moments of each chunk, in double, merged with Chan's formula. Double
// costs little in these short scalar loops and keeps fp32 rows as accurate as
// torch's even when |mean| >> std; the chunking bounds the summation error.
template <typename A>
Welford<double> row_moments(const A* v, int64_t n) {
  Welford<double> total = welford_init<double>();
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    double sum = 0;
    for (int64_t j = 0; j < len; ++j) sum += v[c0 + j];
    const double mean = sum / double(len);
    double m2 = 0;
    for (int64_t j = 0; j < len; ++j) m2 += (v[c0 + j] - mean) * (v[c0 + j] - mean);
    total = welford_merge_scalar(total, Welford<double>{mean, m2, double(len)});
  }
  return total;
}

template <typename A>
double mean_square(const A* v, int64_t n) {
  double total = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    double sq = 0;
    for (int64_t j = c0; j < std::min(n, c0 + kChunk); ++j) sq += double(v[j]) * double(v[j]);
    total += sq;
  }
  return total / double(n);
}

// The rows policy of cpu/layer_norm_driver.h, in plain loops.
struct ScalarRows {
  template <typename T, typename TX = T, typename TY = T>
  static void forward_rows(const TX* x, const T* res, const T* w, const T* b, TY* y, T* s,
                           at::opmath_type<T>* mean_out, at::opmath_type<T>* rstd_out, int64_t r0, int64_t r1,
                           int64_t n, double eps, bool rms, bool /*stream*/, at::opmath_type<T>* row) {
    using A = at::opmath_type<T>;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      // s is rounded to T before the statistics: the backward reads the stored
      // s back, and (s - mean) must be exact there, or rstd amplifies the
      // rounding (e.g. N = 1, where s - mean is 0 and rstd = 1/sqrt(eps)).
      if (res) {
        for (int64_t j = 0; j < n; ++j) {
          s[off + j] = T(A(x[off + j]) + A(res[off + j]));
          row[j] = A(s[off + j]);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] = A(x[off + j]);
      }
      A mean = 0;
      double var;
      if (rms) {
        var = mean_square(row, n);
      } else {
        Welford<double> m = row_moments(row, n);
        mean = A(m.mean);
        var = m.m2 / double(n);
        mean_out[r] = mean;
      }
      const A rstd = A(1.0 / std::sqrt(var + eps));
      rstd_out[r] = rstd;
      for (int64_t j = 0; j < n; ++j) {
        A v = (row[j] - mean) * rstd;
        if (w) v = v * A(w[j]);
        if (b) v = v + A(b[j]);
        y[off + j] = TY(v);
      }
    }
  }

  // One part = a fixed range of rows; it writes grad_input for its rows and its
  // own dweight/dbias partial row, so the reduction order never depends on threads.
  template <typename T, typename TG = T, typename TL = T>
  static void backward_part(const TG* gy, const T* gs, const T* s, const at::opmath_type<T>* mean,
                            const at::opmath_type<T>* rstd, const T* w, T* gx, TL* gx_low, at::opmath_type<T>* dw,
                            at::opmath_type<T>* db, int64_t r0, int64_t r1, int64_t n, bool rms,
                            bool /*stream*/) {
    using A = at::opmath_type<T>;
    if (dw) std::fill(dw, dw + n, A(0));
    if (db) std::fill(db, db + n, A(0));
    std::vector<A> xhat(n), g(n);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = r * n;
      const A mu = rms ? A(0) : mean[r], rs = rstd[r];
      A sum_g = 0, sum_gx = 0;
      for (int64_t j = 0; j < n; ++j) {
        const A dy = A(gy[off + j]);
        xhat[j] = (A(s[off + j]) - mu) * rs;
        g[j] = w ? dy * A(w[j]) : dy;
        sum_g += g[j];
        sum_gx += g[j] * xhat[j];
        if (dw) dw[j] += dy * xhat[j];
        if (db) db[j] += dy;
      }
      const A mean_g = rms ? A(0) : sum_g / A(n), mean_gx = sum_gx / A(n);
      for (int64_t j = 0; j < n; ++j) {
        A v = (g[j] - mean_g - xhat[j] * mean_gx) * rs;
        if (gs) v += A(gs[off + j]);
        gx[off + j] = T(v);
        if (gx_low) gx_low[off + j] = TL(v);
      }
    }
  }

  template <typename T>
  static void sum_partials(const at::opmath_type<T>* partial, int64_t parts, int64_t n, T* out) {
    for (int64_t j = 0; j < n; ++j) {
      at::opmath_type<T> t = partial[j];
      for (int64_t k = 1; k < parts; ++k) t += partial[k * n + j];
      out[j] = T(t);
    }
  }
};

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              "layer_norm: ", name, " must be contiguous with the shape and dtype of x ", x.sizes(), ", got ",
              t.sizes(), " ", t.scalar_type());
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  if (!t.defined()) return;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1) && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              "layer_norm: ", name, " must be a contiguous (", x.size(1), ",) tensor of dtype ", x.scalar_type(),
              ", got ", t.sizes(), " ", t.scalar_type());
}

// The tensor an optional holds, or an undefined one.
at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

const NormKernels& kernels_for_this_cpu() {
  switch (cpu_isa()) {
#ifdef FASTTX_HAVE_VEC_ISAS
    case CpuIsa::kAvx512: return avx512::norm;
    case CpuIsa::kAvx2: return avx2::norm;
#endif
    default: return portable::norm;
  }
}

}  // namespace

namespace portable {
const NormKernels norm = norm_driver::kernels<ScalarRows>();
}  // namespace portable

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, std::optional<at::ScalarType> y_dtype) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "layer_norm: x must be a contiguous 2-D tensor, got ", x.sizes());
  const at::Tensor res = or_undefined(residual), w = or_undefined(weight), b = or_undefined(bias);
  // The statistics' type: the residual's when a narrower x is added to it.
  const at::Tensor& stats_like = res.defined() ? res : x;
  if (res.defined()) {
    TORCH_CHECK(res.sizes() == x.sizes() && res.is_contiguous(), "layer_norm: residual must be contiguous with the "
                "shape of x ", x.sizes(), ", got ", res.sizes());
    TORCH_CHECK(res.scalar_type() == x.scalar_type() || res.scalar_type() == at::kFloat, "layer_norm: residual "
                "must have x's dtype ", x.scalar_type(), " or be float32 beside a narrower x, got ", res.scalar_type());
  }
  check_param(w, "weight", stats_like);
  check_param(b, "bias", stats_like);
  TORCH_CHECK(!(rms && b.defined()), "rms_norm takes no bias");
  const int64_t m = x.size(0);
  const auto acc = stats_like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = empty_output(x.sizes(), x.options().dtype(y_dtype.value_or(stats_like.scalar_type())));
  auto s = res.defined() ? empty_output(res) : at::Tensor();
  auto mean = rms ? at::Tensor() : at::empty({m}, x.options().dtype(acc));
  auto rstd = at::empty({m}, x.options().dtype(acc));
  if (x.numel() > 0) kernels_for_this_cpu().forward(x, res, w, b, y, s, mean, rstd, eps, rms);
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  if (residual) check_rows(*residual, "residual", x);
  return norm_fwd_cpu(x, residual, weight, bias, eps, rms, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms, std::optional<at::ScalarType> low_grad_dtype) {
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous(), "layer_norm backward: s must be a contiguous 2-D tensor");
  const at::Tensor gs = or_undefined(grad_s), mu = or_undefined(mean), w = or_undefined(weight);
  TORCH_CHECK(grad_y.sizes() == s.sizes() && grad_y.is_contiguous() &&
                  (grad_y.scalar_type() == s.scalar_type() || s.scalar_type() == at::kFloat),
              "layer_norm backward: grad_y must be contiguous with the shape of s ", s.sizes(), " and its dtype "
              "(or a narrower one beside float32 s), got ", grad_y.sizes(), " ", grad_y.scalar_type());
  if (gs.defined()) check_rows(gs, "grad_s", s);
  check_param(w, "weight", s);
  TORCH_CHECK(rms || mu.defined(), "layer_norm backward: mean is required unless rms");
  const int64_t m = s.size(0), n = s.size(1);
  const auto acc = rstd.scalar_type();
  const int64_t parts = column_sum_parts(m);
  auto gx = empty_output(s);
  auto gx_low = low_grad_dtype ? at::empty(s.sizes(), s.options().dtype(*low_grad_dtype)) : at::Tensor();
  auto dw_part = w.defined() ? at::empty({parts, n}, s.options().dtype(acc)) : at::Tensor();
  auto db_part = has_bias ? at::empty({parts, n}, s.options().dtype(acc)) : at::Tensor();
  auto dw = w.defined() ? at::empty({n}, s.options()) : at::Tensor();
  auto db = has_bias ? at::empty({n}, s.options()) : at::Tensor();
  if (s.numel() > 0) {
    kernels_for_this_cpu().backward(grad_y, gs, s, mu, rstd, w, gx, gx_low, dw, db, dw_part, db_part, rms);
  } else {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
  }
  return {gx, dw, db, gx_low};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms) {
  check_rows(grad_y, "grad_y", s);
  auto [gx, dw, db, gx_low] = norm_bwd_cpu(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms, std::nullopt);
  return {gx, dw, db};
}

}  // namespace fasttx
