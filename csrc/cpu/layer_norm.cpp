// Row normalization on the CPU: layer_norm, add_layer_norm and rms_norm,
// forward and backward, one kernel family (see csrc/ops.h for the contract).
//
// Each row is staged once in an fp32 (fp64 for double) scratch row that stays
// in L1/L2, so x and the residual are read from memory once and y (and s)
// written once. Statistics come from exact per-chunk moments merged with
// Chan's formula (csrc/common/welford.h): accurate when |mean| >> std, and
// the chunk loops vectorize.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/welford.h"
#include "ops.h"

namespace fasttx {
namespace {

constexpr int64_t kChunk = 256;      // elements per exact-moment chunk
constexpr int64_t kMaxParts = 64;    // row chunks for dweight/dbias partials
constexpr int64_t kMinPartRows = 16;

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

template <typename T>
void forward_rows(const T* x, const T* res, const T* w, const T* b, T* y, T* s, at::opmath_type<T>* mean_out,
                  at::opmath_type<T>* rstd_out, int64_t r0, int64_t r1, int64_t n, double eps, bool rms) {
  using A = at::opmath_type<T>;
  std::vector<A> row(n);
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
      var = mean_square(row.data(), n);
    } else {
      Welford<double> m = row_moments(row.data(), n);
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
      y[off + j] = T(v);
    }
  }
}

// One part = a fixed range of rows; it writes grad_input for its rows and its
// own dweight/dbias partial row, so the reduction order never depends on threads.
template <typename T>
void backward_part(const T* gy, const T* gs, const T* s, const at::opmath_type<T>* mean,
                   const at::opmath_type<T>* rstd, const T* w, T* gx, at::opmath_type<T>* dw,
                   at::opmath_type<T>* db, int64_t r0, int64_t r1, int64_t n, bool rms) {
  using A = at::opmath_type<T>;
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
    }
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              "layer_norm: ", name, " must be contiguous with the shape and dtype of x ", x.sizes(), ", got ",
              t.sizes(), " ", t.scalar_type());
}

void check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
              "layer_norm: ", name, " must be a contiguous (", x.size(1), ",) tensor of dtype ", x.scalar_type(),
              ", got ", t->sizes(), " ", t->scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "layer_norm: x must be a contiguous 2-D tensor, got ", x.sizes());
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_rows(*residual, "residual", x);
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  TORCH_CHECK(!(rms && bias.has_value() && bias->defined()), "rms_norm takes no bias");
  const int64_t m = x.size(0), n = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = at::empty_like(x);
  auto s = has_res ? at::empty_like(x) : at::Tensor();
  auto mean = rms ? at::Tensor() : at::empty({m}, x.options().dtype(acc));
  auto rstd = at::empty({m}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = ptr_or_null<scalar_t>(weight);
    const scalar_t* bp = ptr_or_null<scalar_t>(bias);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* sp = has_res ? s.mutable_data_ptr<scalar_t>() : nullptr;
    A* mp = rms ? nullptr : mean.mutable_data_ptr<A>();
    A* rsp = rstd.mutable_data_ptr<A>();
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      forward_rows(xp, rp, wp, bp, yp, sp, mp, rsp, r0, r1, n, eps, rms);
    });
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_s, const at::Tensor& s,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    bool has_bias, bool rms) {
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous(), "layer_norm backward: s must be a contiguous 2-D tensor");
  check_rows(grad_y, "grad_y", s);
  const bool has_gs = grad_s.has_value() && grad_s->defined();
  if (has_gs) check_rows(*grad_s, "grad_s", s);
  check_param(weight, "weight", s);
  TORCH_CHECK(rms || (mean.has_value() && mean->defined()), "layer_norm backward: mean is required unless rms");
  const int64_t m = s.size(0), n = s.size(1);
  const auto acc = rstd.scalar_type();
  const bool has_w = weight.has_value() && weight->defined();
  // Row parts depend only on the shape, so dweight/dbias are bitwise reproducible.
  const int64_t parts = std::max<int64_t>(1, std::min(kMaxParts, m / kMinPartRows));
  auto gx = at::empty_like(s);
  auto dw_part = has_w ? at::zeros({parts, n}, s.options().dtype(acc)) : at::Tensor();
  auto db_part = has_bias ? at::zeros({parts, n}, s.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* gsp = has_gs ? grad_s->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const A* mp = rms ? nullptr : mean->const_data_ptr<A>();
    const A* rsp = rstd.const_data_ptr<A>();
    const scalar_t* wp = ptr_or_null<scalar_t>(weight);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    A* dwp = has_w ? dw_part.mutable_data_ptr<A>() : nullptr;
    A* dbp = has_bias ? db_part.mutable_data_ptr<A>() : nullptr;
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        backward_part(gyp, gsp, sp, mp, rsp, wp, gxp, dwp ? dwp + p * n : nullptr, dbp ? dbp + p * n : nullptr,
                      m * p / parts, m * (p + 1) / parts, n, rms);
      }
    });
  });
  auto param_dtype = has_w ? weight->scalar_type() : s.scalar_type();
  auto dw = has_w ? dw_part.sum(0).to(param_dtype) : at::Tensor();
  auto db = has_bias ? db_part.sum(0).to(param_dtype) : at::Tensor();
  return {gx, dw, db};
}

}  // namespace fasttx
