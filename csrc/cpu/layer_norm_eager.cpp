// The eager CPU fast path of layer_norm, add_layer_norm and rms_norm: the
// checks, the reshape to rows and the autograd node, in C++.
//
// Why: at (4096, 768) the kernel takes about 0.5 ms, and the Python path around
// it (checks, backend choice, autograd.Function, reshapes) took 0.1 ms more,
// because the kernel's 25 MB of rows evict the interpreter's working set and
// every Python step after it misses cache. Eager F.layer_norm pays a few
// microseconds there. This path serves only the plain case (CPU tensors of one
// float dtype once autocast's casts are made, nothing tracing) and returns
// nothing otherwise, so that fasttx/ops/layer_norm.py's Python path, which owns
// every error message and every other backend, takes the call. The kernels
// are the same ones.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>

#include <memory>
#include <optional>
#include <tuple>

#include "ops.h"

namespace fasttx {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

bool is_narrow(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Keys of tensors that something wraps: Python subclasses (FakeTensor...),
// functorch's vmap and grad, functionalization.
const c10::DispatchKeySet kWrapped({c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                    c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize});

bool unwrapped(const at::Tensor& t) { return !t.key_set().has_any(kWrapped); }

// A CPU tensor of x's dtype that nothing intercepts.
bool plain_like(const at::Tensor& t, const at::Tensor& x) {
  return t.device().is_cpu() && t.scalar_type() == x.scalar_type() && unwrapped(t);
}

bool parameter_ok(const at::Tensor& p, const at::Tensor& x, at::IntArrayRef shape) {
  return !p.defined() || (plain_like(p, x) && p.sizes() == shape);
}

struct NormFunction : public torch::autograd::Function<NormFunction> {
  // x and residual are (M, N) rows, weight and bias (N,). With a residual, x
  // may be narrower than it (see norm_fwd_cpu); y is stored in y_dtype.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps, bool rms, std::optional<at::ScalarType> y_dtype) {
    auto [y, s, mean, rstd] = norm_fwd_cpu(x, residual, weight, bias, eps, rms, y_dtype);
    const bool has_residual = residual.has_value();
    ctx->save_for_backward({has_residual ? s : x, mean, rstd, weight.value_or(at::Tensor())});
    ctx->saved_data["has_residual"] = has_residual;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["eps"] = eps;
    // x's grad, when x is narrower than s: the kernel writes it beside s's.
    ctx->saved_data["x_dtype"] = has_residual && x.scalar_type() != s.scalar_type()
                                     ? c10::IValue(static_cast<int64_t>(x.scalar_type()))
                                     : c10::IValue();
    ctx->set_materialize_grads(false);  // add_layer_norm's s often has no gradient: don't add zeros
    return has_residual ? variable_list{y, s} : variable_list{y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool(), rms = ctx->saved_data["rms"].toBool();
    const c10::IValue& x_dtype = ctx->saved_data["x_dtype"];
    const auto low = x_dtype.isNone() ? std::nullopt
                                      : std::optional<at::ScalarType>(static_cast<at::ScalarType>(x_dtype.toInt()));
    // Autograd hands over grads of any layout (a stride-0 expand from .sum(), say).
    const at::Tensor grad_y = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(s);
    const at::Tensor grad_s = has_residual && grads[1].defined() ? grads[1].contiguous() : at::Tensor();
    at::Tensor gx, gw, gb, gx_low;
    if (at::GradMode::is_enabled()) {  // create_graph=True: autograd records this backward
      std::tie(gx, gw, gb) = differentiable_backward(grad_y, grad_s, s, weight, has_bias, rms,
                                                     ctx->saved_data["eps"].toDouble());
      if (low) gx_low = gx.to(*low);
    } else {
      std::tie(gx, gw, gb, gx_low) = norm_bwd_cpu(grad_y, maybe(grad_s), s, maybe(mean), rstd, maybe(weight),
                                                  has_bias, rms, low);
    }
    return {low ? gx_low : gx, has_residual ? gx : at::Tensor(), weight.defined() ? gw : at::Tensor(),
            has_bias ? gb : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

  // The backward in ATen ops, so that a second derivative (a gradient penalty) gets every term; the
  // kernel's would be constants to autograd. The statistics are recomputed from s for the same reason:
  // the saved mean and rstd carry no graph. _torch_backward in fasttx/ops/layer_norm.py, in C++.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_backward(
      const at::Tensor& grad_y, const at::Tensor& grad_s, const at::Tensor& s, const at::Tensor& weight,
      bool has_bias, bool rms, double eps) {
    const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor sa = s.to(acc), gy = grad_y.to(acc);
    const at::Tensor centred = rms ? sa : sa - sa.mean(-1, true);
    const at::Tensor rstd = at::rsqrt(centred.square().mean(-1, true) + eps);
    const at::Tensor xhat = centred * rstd;
    const at::Tensor g = weight.defined() ? gy * weight.to(acc) : gy;
    const at::Tensor proj = (g * xhat).mean(-1, true);
    at::Tensor gx = (rms ? g - proj * xhat : g - g.mean(-1, true) - proj * xhat) * rstd;
    if (grad_s.defined()) gx = gx + grad_s.to(acc);
    const at::Tensor gw = weight.defined() ? (gy * xhat).sum(0).to(weight.scalar_type()) : at::Tensor();
    const at::Tensor gb = has_bias ? gy.sum(0).to(weight.defined() ? weight.scalar_type() : s.scalar_type())
                                   : at::Tensor();
    return {gx.to(s.scalar_type()), gw, gb};
  }
};

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor>> norm_eager_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, bool rms,
    std::optional<at::ScalarType> out_dtype) {
  at::Tensor x = x_in, res = residual.value_or(at::Tensor());
  at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  // Anything but the plain case goes back to Python, which checks it and says what is wrong.
  const auto plain = [](const at::Tensor& t) { return !t.defined() || (t.device().is_cpu() && unwrapped(t)); };
  if (!x.defined() || !plain(x) || !plain(res) || !plain(w) || !plain(b)) return std::nullopt;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode))
    return std::nullopt;
  if (out_dtype && !is_float(*out_dtype)) return std::nullopt;
  if (at::autocast::is_autocast_enabled(at::kCPU)) {
    // The casts of fasttx/ops/_autocast.py (promoted, params_like): a bf16
    // branch meets an fp32 residual in fp32, and the norm's parameters follow
    // the statistics. Under autocast these went through the Python path, ~0.5
    // ms per add_layer_norm forward+backward at (2048, 384). A bf16/half branch
    // beside an fp32 residual needs no cast at all: the kernel reads it as it
    // is and writes its gradient in its dtype (mixed below).
    const auto floating = [](const at::Tensor& t) { return t.defined() && is_float(t.scalar_type()); };
    if (floating(x) && floating(res) && x.scalar_type() != res.scalar_type()) {
      if (x.scalar_type() == at::kFloat && is_narrow(res.scalar_type())) std::swap(x, res);  // a + b is b + a
      if (!(res.scalar_type() == at::kFloat && is_narrow(x.scalar_type()))) {
        const auto common = at::promote_types(x.scalar_type(), res.scalar_type());
        x = x.to(common);
        res = res.to(common);
      }
    }
    const at::Tensor& stats_like = res.defined() ? res : x;
    if (floating(stats_like) && floating(w) && w.scalar_type() != stats_like.scalar_type())
      w = w.to(stats_like.scalar_type());
    if (floating(stats_like) && floating(b) && b.scalar_type() != stats_like.scalar_type())
      b = b.to(stats_like.scalar_type());
  }
  const at::Tensor& stats_like = res.defined() ? res : x;
  // Only autocast mixes dtypes; elsewhere the Python path says what is wrong.
  const bool mixed = res.defined() && x.scalar_type() != res.scalar_type() &&
                     at::autocast::is_autocast_enabled(at::kCPU);
  const int64_t k = int64_t(normalized_shape.size());
  if (!is_float(x.scalar_type()) || x.numel() == 0 || k == 0 || x.dim() < k ||
      x.sizes().slice(x.dim() - k) != normalized_shape || !parameter_ok(w, stats_like, normalized_shape) ||
      !parameter_ok(b, stats_like, normalized_shape) || (rms && b.defined()) ||
      (res.defined() && (!(mixed ? res.device().is_cpu() && unwrapped(res) : plain_like(res, x)) ||
                         res.sizes() != x.sizes())) ||
      (mixed && !(res.scalar_type() == at::kFloat && is_narrow(x.scalar_type()))))
    return std::nullopt;
  // y straight in out_dtype where the kernel can (float statistics, or no
  // change); else a cast after it.
  const at::ScalarType stats_type = stats_like.scalar_type();
  const bool y_in_kernel = !out_dtype || *out_dtype == stats_type ||
                           (stats_type == at::kFloat && (is_narrow(*out_dtype)));
  const auto y_dtype = y_in_kernel ? out_dtype : std::nullopt;
  const auto finish = [&](at::Tensor y) { return y_in_kernel || !out_dtype ? y : y.to(*out_dtype); };

  // Each dispatcher call here runs cache-cold after the kernel: skip the no-op ones.
  const int64_t n = c10::multiply_integers(normalized_shape), rows = x.numel() / n;
  const auto as_rows = [&](const at::Tensor& t) -> std::optional<at::Tensor> {
    if (!t.defined()) return std::nullopt;
    return t.dim() == 2 && t.size(1) == n && t.is_contiguous() ? t : t.reshape({rows, n}).contiguous();
  };
  const auto as_row = [&](const at::Tensor& t) -> std::optional<at::Tensor> {
    if (!t.defined()) return std::nullopt;
    return t.dim() == 1 && t.is_contiguous() ? t : t.reshape({n}).contiguous();
  };
  const auto as_x = [&](const at::Tensor& t) { return !t.defined() || t.sizes() == x.sizes() ? t : t.view(x.sizes()); };
  const bool needs_grad = at::GradMode::is_enabled() && (x.requires_grad() || (res.defined() && res.requires_grad()) ||
                                                         (w.defined() && w.requires_grad()) ||
                                                         (b.defined() && b.requires_grad()));
  if (!needs_grad) {
    auto [y, s, mean, rstd] = norm_fwd_cpu(*as_rows(x), as_rows(res), as_row(w), as_row(b), eps, rms, y_dtype);
    return std::make_tuple(finish(as_x(y)), as_x(s));
  }
  const auto outputs = NormFunction::apply(*as_rows(x), as_rows(res), as_row(w), as_row(b), eps, rms, y_dtype);
  return std::make_tuple(finish(as_x(outputs[0])), res.defined() ? as_x(outputs[1]) : at::Tensor());
}

}  // namespace fasttx
