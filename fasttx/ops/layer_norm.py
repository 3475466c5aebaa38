"""layer_norm, add_layer_norm and rms_norm: one fused row normalization.

The three ops share one kernel family per backend (triton, cuda, cpu, and
torch as the reference): an optional residual add, then mean/variance (LayerNorm) or
mean square (RMSNorm) in fp32 or better, then the affine transform, in one
read and one write of each element. The backward
recomputes the normalized row from the saved input and rstd (never storing
it), and sums dweight/dbias through fixed per-chunk partials so that it is
bitwise deterministic.

Eager add + LayerNorm moves 5 elements per element forward (read x, r; write
s; read s; write y) and 6 backward; fused it is 4 and 4.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops._autocast import params_like, promoted
from fasttx.ops._checks import check_float, check_real, check_same, check_shape, check_tensor
from fasttx.ops._eager import (PLAIN_TENSOR_TYPES as _PLAIN, eager_function, graphed_backward, plain_eager,
                               under_transform)

ShapeLike = Union[int, Sequence[int], torch.Size]


# ---- references: plain PyTorch --------------------------------------------------

def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def add_layer_norm_ref(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = x + residual
    return F.layer_norm(s, normalized_shape, weight, bias, eps), s


def rms_norm_ref(x, normalized_shape, weight=None, eps=None):
    return F.rms_norm(x, normalized_shape, weight, eps)


def add_rms_norm_ref(x, residual, normalized_shape, weight=None, eps=None):
    s = x + residual
    return F.rms_norm(s, normalized_shape, weight, eps), s


# ---- the torch backend: the kernels' contract, written in PyTorch ------------------
# Rows of a 2-D (M, N) input; statistics in fp32 (fp64 for double), as the kernels do.

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_forward(x, residual, weight, bias, eps, rms):
    s = x + residual if residual is not None else x
    sa = s.to(_acc_dtype(x.dtype))
    if rms:
        mean = None
        rstd = torch.rsqrt(sa.square().mean(-1) + eps)
        xhat = sa * rstd[:, None]
    else:
        # The summed mean is off by a few ulps, which rstd amplifies (316x on a constant row, whose
        # output must be exactly the bias); the mean of the residuals corrects it, as the kernels do.
        mean = sa.mean(-1)
        mean = mean + (sa - mean[:, None]).mean(-1)
        centred = sa - mean[:, None]
        rstd = torch.rsqrt(centred.square().mean(-1) + eps)
        xhat = centred * rstd[:, None]
    y = xhat * weight.to(sa.dtype) if weight is not None else xhat
    y = y + bias.to(sa.dtype) if bias is not None else y
    return y.to(x.dtype), (s if residual is not None else None), mean, rstd


def _param_dtype(weight, s):
    """The dtype of grad_bias: weight's, or the input's when there is a bias but no weight."""
    return weight.dtype if weight is not None else s.dtype


def _torch_backward(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms):
    acc = rstd.dtype
    sa, gy = s.to(acc), grad_y.to(acc)
    xhat = (sa if rms else sa - mean[:, None]) * rstd[:, None]
    g = gy * weight.to(acc) if weight is not None else gy
    proj = (g * xhat).mean(-1, keepdim=True)
    centred_g = g - proj * xhat if rms else g - g.mean(-1, keepdim=True) - proj * xhat
    grad_input = centred_g * rstd[:, None]
    if grad_s is not None:
        grad_input = grad_input + grad_s.to(acc)
    grad_weight = (gy * xhat).sum(0).to(weight.dtype) if weight is not None else None
    grad_bias = gy.sum(0).to(_param_dtype(weight, s)) if has_bias else None
    return grad_input.to(s.dtype), grad_weight, grad_bias


def _differentiable_backward(grad_y, grad_s, s, weight, has_bias, rms, eps):
    """_torch_backward with the statistics recomputed from s: the saved ones carry no graph, so a
    backward that autograd records (create_graph=True) would miss their terms."""
    _, _, mean, rstd = _torch_forward(s, None, None, None, eps, rms)
    return _torch_backward(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms)


def _cpu_forward(*args):
    return backends.extension().layer_norm_fwd_cpu(*args)


def _cpu_backward(*args):
    return backends.extension().layer_norm_bwd_cpu(*args)


def _cuda_forward(*args):
    return backends.extension().layer_norm_fwd_cuda(*args)


def _cuda_backward(*args):
    return backends.extension().layer_norm_bwd_cuda(*args)


def _triton_forward(*args):
    from fasttx.kernels import layer_norm as k
    return k.norm_forward(*args)


def _triton_backward(*args):
    from fasttx.kernels import layer_norm as k
    return k.norm_backward(*args)


# Every backend runs the same contract: _torch_forward / _torch_backward above.
IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.device_only("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


def _op_name(residual, rms):
    return ("add_" if residual is not None else "") + ("rms_norm" if rms else "layer_norm")


# ---- forward and backward on (M, N) rows: the bodies of the custom ops --------------
# Absent outputs are returned as empty tensors: custom ops cannot return None.

def _empty(t: Tensor, dtype=None) -> Tensor:
    return t.new_empty(0, dtype=dtype)


def _norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = backends.choose(_op_name(residual, rms), IMPLEMENTATIONS, backend, x)
    acc = _acc_dtype(x.dtype)
    if x.numel() == 0:
        s = x + residual if residual is not None else _empty(x)
        stats = x.new_zeros(x.shape[0], dtype=acc)
        return x.new_empty(x.shape), s, (_empty(x, acc) if rms else stats), stats.clone()
    y, s, mean, rstd = impl.forward(x, residual, weight, bias, eps, rms)
    return y, (s if s is not None else _empty(x)), (mean if mean is not None else _empty(x, acc)), rstd


def _norm_backward(grad_y: Tensor, grad_s: Optional[Tensor], s: Tensor, mean: Optional[Tensor], rstd: Tensor,
                   weight: Optional[Tensor], has_bias: bool, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = backends.choose(_op_name(grad_s, rms), IMPLEMENTATIONS, backend, s)
    if s.numel() == 0:
        grad_input = s.new_empty(s.shape)
        grad_weight = torch.zeros_like(weight) if weight is not None else _empty(s)
        return grad_input, grad_weight, (s.new_zeros(s.shape[1:], dtype=_param_dtype(weight, s)) if has_bias else _empty(s))
    # Autograd hands over grads of any layout (a stride-0 expand from .sum(), say).
    grad_y = grad_y.contiguous()
    grad_s = grad_s.contiguous() if grad_s is not None else None
    grad_input, grad_weight, grad_bias = impl.backward(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms)
    return (grad_input, grad_weight if grad_weight is not None else _empty(s),
            grad_bias if grad_bias is not None else _empty(s))


# ---- torch.library registration, and the eager autograd.Function ---------------------

@torch.library.custom_op("fasttx::norm_forward", mutates_args=())
def _norm_forward_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _norm_forward(x, residual, weight, bias, eps, rms, backend)


@_norm_forward_op.register_fake
def _(x, residual, weight, bias, eps, rms, backend):
    acc = _acc_dtype(x.dtype)
    s = x.new_empty(x.shape) if residual is not None else _empty(x)
    mean = _empty(x, acc) if rms else x.new_empty(x.shape[0], dtype=acc)
    return x.new_empty(x.shape), s, mean, x.new_empty(x.shape[0], dtype=acc)


@torch.library.custom_op("fasttx::norm_backward", mutates_args=())
def _norm_backward_op(grad_y: Tensor, grad_s: Optional[Tensor], s: Tensor, mean: Optional[Tensor], rstd: Tensor,
                      weight: Optional[Tensor], has_bias: bool, rms: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _norm_backward(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms, backend)


@_norm_backward_op.register_fake
def _(grad_y, grad_s, s, mean, rstd, weight, has_bias, rms, backend):
    grad_weight = weight.new_empty(weight.shape) if weight is not None else _empty(s)
    grad_bias = s.new_empty(s.shape[1:], dtype=_param_dtype(weight, s)) if has_bias else _empty(s)
    return s.new_empty(s.shape), grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, backend = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, mean, rstd, weight)
    ctx.has_residual, ctx.has_bias, ctx.rms, ctx.backend = residual is not None, bias is not None, rms, backend
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # add_layer_norm's s often has no gradient; don't add zeros


def _autograd_backward(norm_backward):
    def run(ctx, grad_y, grad_s, _grad_mean, _grad_rstd):
        s, mean, rstd, weight = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(s)
        grad_s = grad_s if ctx.has_residual else None
        if graphed_backward():
            grad_input, grad_weight, grad_bias = _differentiable_backward(grad_y, grad_s, s, weight, ctx.has_bias,
                                                                          ctx.rms, ctx.eps)
        else:
            grad_input, grad_weight, grad_bias = norm_backward(grad_y, grad_s, s, None if ctx.rms else mean, rstd,
                                                               weight, ctx.has_bias, ctx.rms, ctx.backend)
        return (grad_input, grad_input if ctx.has_residual else None,
                grad_weight if weight is not None else None, grad_bias if ctx.has_bias else None, None, None, None)
    return run


_norm_forward_op.register_autograd(_autograd_backward(_norm_backward_op), setup_context=_setup_context)
_NormFunction = eager_function("_NormFunction", _norm_forward, _setup_context, _autograd_backward(_norm_backward))


def _norm(x, residual, weight, bias, eps, rms):
    args = (x, residual, weight, bias, eps, rms, backends.requested_backend())
    if plain_eager(x, residual, weight, bias):
        return _NormFunction.apply(*args)
    if under_transform():
        return _torch_forward(*args[:-1])
    return _norm_forward_op(*args)


# ---- the eager CPU fast path ------------------------------------------------------
# A plain eager call on CPU tensors runs checks, reshapes and autograd in C++
# (csrc/cpu/layer_norm_eager.cpp): after a kernel has swept the caches, the
# Python steps around it cost as much as the kernel at (4096, 768). It returns
# None for anything but the plain case, and the Python path below takes over.

_PLAIN_OR_NONE = (*_PLAIN, type(None))


def _eager_cpu(x, residual, normalized_shape, weight, bias, eps, rms, out_dtype):
    if (type(x) not in _PLAIN or not x.is_cpu or type(residual) not in _PLAIN_OR_NONE
            or type(weight) not in _PLAIN_OR_NONE or type(bias) not in _PLAIN_OR_NONE
            or torch.compiler.is_compiling() or torch._C._is_tracing() or under_transform()
            or not backends.cpu_backend_takes_cpu_tensors(backends.requested_backend())):
        return None
    shape = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
    try:
        return backends.extension().norm_eager_cpu(x, residual, shape, weight, bias, float(eps), rms, out_dtype)
    except TypeError:  # an argument pybind cannot convert: the Python path says what is wrong with it
        return None


# ---- public API ---------------------------------------------------------------

def _check_scalars(op, normalized_shape, eps, out_dtype, eps_none_ok=False) -> tuple:
    """normalized_shape as a tuple, once eps and out_dtype are checked too."""
    shape = check_shape(op, "normalized_shape", normalized_shape)
    check_real(op, "eps", eps, low=0.0, none_ok=eps_none_ok)
    _check_out_dtype(op, out_dtype)
    return shape


_NARROW = (torch.bfloat16, torch.float16)


def _mixed_params(op, x, residual, params, out_dtype, rms):
    """torch's mixed parameter dtypes, in one dtype for the kernels: (x, residual, params, out_dtype, x_dtype).

    F.layer_norm takes float32 weight and bias for a bfloat16/float16 input (a float32 bias alone
    too, though its backward then fails), and F.rms_norm any float weight; both return the input's
    dtype, computed in the wider one. Here x (and the residual) and the parameters go to that dtype,
    and the output is rounded once to x's: exact casts, so the result is torch's, and the
    parameters' gradients come back in their own dtype. Anything else (or autocast, whose casts
    params_like makes) passes through for the checks to judge. x_dtype is None when nothing changed.
    """
    x_dtype = getattr(x, "dtype", None)
    if all(p is None or getattr(p, "dtype", x_dtype) == x_dtype for p in params):
        return x, residual, params, out_dtype, None  # the common case, first and cheap
    given = [p for p in params if isinstance(p, Tensor)]
    if not isinstance(x, Tensor) or not x.is_floating_point() or not all(p.is_floating_point() for p in given) \
            or (x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)):
        return x, residual, params, out_dtype, None
    if rms:
        dtype = x.dtype
        for p in given:
            dtype = torch.promote_types(dtype, p.dtype)
    elif x.dtype in _NARROW and all(p.dtype == torch.float32 for p in given):
        dtype = torch.float32
    else:
        name, bad = next((n, p) for n, p in zip(("weight", "bias"), params) if p is not None and p.dtype != x.dtype)
        raise TypeError(f"fasttx.{op}: {name} has dtype {bad.dtype} but x has {x.dtype}; {op} takes weight and "
                        "bias in x's dtype, or both in float32 for a bfloat16/float16 x, as torch does")
    if residual is not None and not (isinstance(residual, Tensor) and residual.dtype == x.dtype):
        return x, residual, params, out_dtype, None  # the residual check says what is wrong
    cast = lambda t: t.to(dtype) if isinstance(t, Tensor) else t
    return cast(x), cast(residual), tuple(cast(p) for p in params), out_dtype or x.dtype, x.dtype


def _check_and_flatten(op, x, normalized_shape, weight, bias):
    """Validate, and view x as rows (M, N) with N = prod(normalized_shape)."""
    check_tensor(op, "x", x)
    check_float(op, "x", x)
    shape = check_shape(op, "normalized_shape", normalized_shape)
    if len(shape) == 0 or tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"fasttx.{op}: normalized_shape {shape} must be a non-empty suffix of the shape of x "
                         f"{tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(op, name, t)
        check_same(op, name, t, "x", x)
        if tuple(t.shape) != shape:
            raise ValueError(f"fasttx.{op}: {name} must have shape normalized_shape = {shape}, got {tuple(t.shape)}")
    n = math.prod(shape)
    rows = math.prod(x.shape[:x.dim() - len(shape)])
    flat = lambda t: t.reshape(n).contiguous() if t is not None else None
    return x.reshape(rows, n).contiguous(), flat(weight), flat(bias)


def _in_dtype(y: Tensor, out_dtype: Optional[torch.dtype]) -> Tensor:
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def _check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"fasttx.{op}: out_dtype must be None or a floating torch.dtype, got {out_dtype!r}")


def layer_norm(x: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.layer_norm``, fused.

    ``out_dtype``: the output's dtype, as ``layer_norm(...).to(out_dtype)`` (computed in the input's
    precision, rounded once). Under autocast, a norm followed by a linear can hand it autocast's dtype
    directly: the CPU kernel then writes bf16 and reads its bf16 gradient, with no cast either way.
    """
    normalized_shape = _check_scalars("layer_norm", normalized_shape, eps, out_dtype)
    x, _, (weight, bias), out_dtype, _ = _mixed_params("layer_norm", x, None, (weight, bias), out_dtype, False)
    fast = _eager_cpu(x, None, normalized_shape, weight, bias, eps, False, out_dtype)
    if fast is not None:
        return fast[0]
    weight, bias = params_like(x, weight, bias)
    x2d, w, b = _check_and_flatten("layer_norm", x, normalized_shape, weight, bias)
    y, _, _, _ = _norm(x2d, None, w, b, float(eps), False)
    return _in_dtype(y.view(x.shape), out_dtype)


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``(layer_norm(x + residual), x + residual)`` in one pass over memory.

    ``out_dtype``: the normed output's dtype, as for layer_norm (the sum keeps its own). Under
    autocast a bf16 x meets an fp32 residual in fp32, as ``x + residual`` does; the CPU kernel reads
    x as it is and writes x's gradient in bf16, with no cast either way.
    """
    op = "add_layer_norm"
    normalized_shape = _check_scalars(op, normalized_shape, eps, out_dtype)
    x, residual, (weight, bias), out_dtype, sum_dtype = _mixed_params(op, x, residual, (weight, bias), out_dtype,
                                                                      False)
    if sum_dtype is not None:  # the sum in x's dtype, as x + residual gives it to torch's layer_norm
        y, s = add_layer_norm(x, residual, normalized_shape, weight, bias, eps, out_dtype=out_dtype)
        return y, s.to(sum_dtype)
    return _add_norm(op, x, residual, normalized_shape, weight, bias, eps, False, out_dtype)


def _add_norm(op, x, residual, normalized_shape, weight, bias, eps, rms, out_dtype) -> tuple[Tensor, Tensor]:
    """add_layer_norm's and add_rms_norm's common part, once their scalars and mixed dtypes are settled."""
    fast = _eager_cpu(x, residual, normalized_shape, weight, bias, eps, rms, out_dtype)
    if fast is not None:
        return fast
    check_tensor(op, "residual", residual)
    if isinstance(x, Tensor):
        x, residual = promoted(x, residual)  # autocast: a bf16 branch meets an fp32 residual in fp32, as x + r
    weight, bias = params_like(x, weight, bias)
    x2d, w, b = _check_and_flatten(op, x, normalized_shape, weight, bias)
    check_same(op, "residual", residual, "x", x)
    if residual.shape != x.shape:
        raise ValueError(f"fasttx.{op}: residual must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    y, s, _, _ = _norm(x2d, residual.reshape(x2d.shape).contiguous(), w, b, float(eps), rms)
    return _in_dtype(y.view(x.shape), out_dtype), s.view(x.shape)


def add_rms_norm(x: Tensor, residual: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, *, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass over memory: a pre-norm block's residual add
    and the next norm (LLaMA's decoder layer). ``eps`` as for rms_norm, dtypes and autocast as for
    add_layer_norm."""
    op = "add_rms_norm"
    normalized_shape = _check_scalars(op, normalized_shape, eps, out_dtype, eps_none_ok=True)
    if isinstance(x, Tensor) and isinstance(residual, Tensor) and x.is_floating_point() and eps is None:
        # the sum's dtype's epsilon (torch's, for x + residual), not the wider one _mixed_params may pick
        eps = torch.finfo(_acc_dtype(torch.promote_types(x.dtype, residual.dtype))).eps
    x, residual, (weight,), out_dtype, sum_dtype = _mixed_params(op, x, residual, (weight,), out_dtype, True)
    if sum_dtype is not None:  # the sum in x's dtype, as x + residual gives it to torch's rms_norm
        y, s = add_rms_norm(x, residual, normalized_shape, weight, eps, out_dtype=out_dtype)
        return y, s.to(sum_dtype)
    return _add_norm(op, x, residual, normalized_shape, weight, None, eps, True, out_dtype)


def rms_norm(x: Tensor, normalized_shape: ShapeLike, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.nn.functional.rms_norm``, fused.

    ``eps=None`` means the machine epsilon of the type the statistics are
    computed in (float32 for float16/bfloat16 inputs), which is what torch does.
    ``out_dtype`` as for layer_norm.
    """
    normalized_shape = _check_scalars("rms_norm", normalized_shape, eps, out_dtype, eps_none_ok=True)
    if eps is None and isinstance(x, Tensor) and x.is_floating_point():
        eps = torch.finfo(_acc_dtype(x.dtype)).eps  # x's, not the wider dtype it may be computed in below
    x, _, (weight,), out_dtype, _ = _mixed_params("rms_norm", x, None, (weight,), out_dtype, True)
    fast = _eager_cpu(x, None, normalized_shape, weight, None, eps, True, out_dtype)
    if fast is not None:
        return fast[0]
    (weight,) = params_like(x, weight)
    x2d, w, _ = _check_and_flatten("rms_norm", x, normalized_shape, weight, None)
    eps = float(eps)
    y, _, _, _ = _norm(x2d, None, w, None, eps, True)
    return _in_dtype(y.view(x.shape), out_dtype)
