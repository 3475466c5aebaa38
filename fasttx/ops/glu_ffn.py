"""glu_ffn: the gated feed-forward of LLaMA-family models (SwiGLU, GeGLU), fused around its GEMMs.

    out = linear(act(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up), w_down, b_down)

Eager ``down(silu(gate(x)) * up(x))`` keeps four (M, H) tensors for backward: gate(x), silu's
output, up(x) and the product. Here the activation and the product are one elementwise pass (or
a GEMM epilogue), and the backward keeps only x and the two pre-activations gate and up: the
product act(gate) * up that grad_w_down needs is recomputed in the same pass that makes the
gradients of gate and up, which reads gate and up anyway. Why keep gate and up rather than
recompute them from x: recomputing is two of the op's nine GEMM-units (forward 3, backward 6,
each 2 M d H FLOPs), ~22% more work, to save 2 M H elements; keeping the product instead of
recomputing it would save one cheap elementwise read and cost M H more. Saved per token:
d + 2 H against eager's d + 4 H (0.54x at LLaMA's H = 2.75 d with x counted, 0.5x without).

Backends: triton (one GEMM kernel with two B operands for gate and up, with the activation and
product in its epilogue), cuda (cuBLASLt plus fused glu passes), cpu (cpu/matmul.h's GEMMs plus
vectorized glu passes) and torch, the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops.glu import ACTIVATION_CODE, ACTIVATIONS, glu_ref
from fasttx.ops.glu import _torch_backward as _glu_torch_backward
from fasttx.ops._autocast import lower_precision
from fasttx.ops._checks import check_choice, check_float, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

_OP = "glu_ffn"


# ---- reference: plain PyTorch ---------------------------------------------------

def glu_ffn_ref(x, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None, b_down=None):
    return F.linear(glu_ref(F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), activation), w_down, b_down)


# ---- the torch backend: the kernels' contract in PyTorch (rows x: (M, D)) ------------

def _column_sum(t: Tensor) -> Tensor:
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(0, dtype=acc).to(t.dtype)


def _torch_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    gate, up = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
    return F.linear(glu_ref(gate, up, activation), w_down, b_down), gate, up


def _torch_backward(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation):
    # Differentiable torch ops: with gate and up recomputed, also the backward that autograd records.
    grad_gate, grad_up = _glu_torch_backward(grad_out @ w_down, gate, up, activation)
    grad_w_down = grad_out.t() @ glu_ref(gate, up, activation)
    return (grad_gate @ w_gate + grad_up @ w_up, grad_gate.t() @ x, _column_sum(grad_gate) if has_b_gate else None,
            grad_up.t() @ x, _column_sum(grad_up) if has_b_up else None, grad_w_down,
            _column_sum(grad_out) if has_b_down else None)


# ---- the other backends ---------------------------------------------------------

def _code(activation):
    return ACTIVATION_CODE[activation]


def _cpu_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    return backends.extension().glu_ffn_fwd_cpu(x, w_gate, b_gate, w_up, b_up, w_down, b_down, _code(activation))


def _cpu_backward(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation):
    return backends.extension().glu_ffn_bwd_cpu(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up,
                                                has_b_down, _code(activation))


def _cuda_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation):
    return backends.extension().glu_ffn_fwd_cuda(x, w_gate, b_gate, w_up, b_up, w_down, b_down, _code(activation))


def _cuda_backward(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation):
    return backends.extension().glu_ffn_bwd_cuda(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up,
                                                 has_b_down, _code(activation))


def _triton_forward(*args):
    from fasttx.kernels import glu_ffn as k
    return k.glu_ffn_forward(*args)


def _triton_backward(*args):
    from fasttx.kernels import glu_ffn as k
    return k.glu_ffn_backward(*args)


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.up_to_float32("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


# ---- forward and backward on (M, D) rows: the bodies of the custom ops --------------
# Absent outputs are empty tensors: custom ops cannot return None.

def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _choose(backend, x, w_gate, w_down):
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, x)
    if 0 in (*x.shape, *w_gate.shape, w_down.shape[0]):  # nothing for a kernel to do; the contract still holds
        impl = IMPLEMENTATIONS[-1]
    return impl


def _forward(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
             w_down: Tensor, b_down: Optional[Tensor], activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    impl = _choose(backend, x, w_gate, w_down)
    return tuple(impl.forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation))


def _backward(grad_out: Tensor, x: Tensor, gate: Tensor, up: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
              has_b_gate: bool, has_b_up: bool, has_b_down: bool, activation: str,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _choose(backend, x, w_gate, w_down)
    grads = impl.backward(grad_out.contiguous(), x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down,
                          activation)
    return tuple(g if g is not None else _empty(x) for g in grads)


@torch.library.custom_op("fasttx::glu_ffn_forward", mutates_args=())
def _glu_ffn_forward_op(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                        w_down: Tensor, b_down: Optional[Tensor], activation: str,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, backend)


@_glu_ffn_forward_op.register_fake
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, backend):
    m, h = x.shape[0], w_gate.shape[0]
    return x.new_empty(m, w_down.shape[0]), x.new_empty(m, h), x.new_empty(m, h)


@torch.library.custom_op("fasttx::glu_ffn_backward", mutates_args=())
def _glu_ffn_backward_op(grad_out: Tensor, x: Tensor, gate: Tensor, up: Tensor, w_gate: Tensor, w_up: Tensor,
                         w_down: Tensor, has_b_gate: bool, has_b_up: bool, has_b_down: bool, activation: str,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation,
                     backend)


@_glu_ffn_backward_op.register_fake
def _(grad_out, x, gate, up, w_gate, w_up, w_down, has_b_gate, has_b_up, has_b_down, activation, backend):
    bias_grad = lambda has, n: x.new_empty(n) if has else _empty(x)
    h = w_gate.shape[0]
    return (x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), bias_grad(has_b_gate, h),
            w_up.new_empty(w_up.shape), bias_grad(has_b_up, h), w_down.new_empty(w_down.shape),
            bias_grad(has_b_down, w_down.shape[0]))


def _setup_context(ctx, inputs, output):
    x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, backend = inputs
    # x and the two pre-activations: never act(gate) or the product, which the backward recomputes.
    ctx.save_for_backward(x, output[1], output[2], w_gate, w_up, w_down, b_gate, b_up)
    ctx.has_b = (b_gate is not None, b_up is not None, b_down is not None)
    ctx.activation, ctx.backend = activation, backend
    ctx.mark_non_differentiable(output[1], output[2])
    # gate and up never have a gradient: without this autograd would hand the backward two (M, H)
    # tensors of zeros, allocated and filled on every call.
    ctx.set_materialize_grads(False)


def _autograd_backward(backward):
    def run(ctx, grad_out, _grad_gate, _grad_up):
        if grad_out is None:  # the output did not reach the loss
            return (None,) * 9
        x, gate, up, w_gate, w_up, w_down, b_gate, b_up = ctx.saved_tensors
        if graphed_backward():  # create_graph=True: the saved gate and up carry no graph, so they are recomputed
            grads = _torch_backward(grad_out, x, F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up), w_gate, w_up,
                                    w_down, *ctx.has_b, ctx.activation)
        else:
            grads = backward(grad_out, x, gate, up, w_gate, w_up, w_down, *ctx.has_b, ctx.activation, ctx.backend)
        grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up, grad_w_down, grad_b_down = grads
        has_bg, has_bu, has_bd = ctx.has_b
        return (grad_x, grad_w_gate, grad_b_gate if has_bg else None, grad_w_up, grad_b_up if has_bu else None,
                grad_w_down, grad_b_down if has_bd else None, None, None)
    return run


_glu_ffn_forward_op.register_autograd(_autograd_backward(_glu_ffn_backward_op), setup_context=_setup_context)
_GluFFNFunction = eager_function("_GluFFNFunction", _forward, _setup_context, _autograd_backward(_backward))


# ---- public API ---------------------------------------------------------------

def _check(x, w_gate, w_up, w_down, activation, b_gate, b_up, b_down):
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_tensor(_OP, name, t)
    check_float(_OP, "x", x)
    check_choice(_OP, "activation", activation, ACTIVATIONS)
    if x.dim() == 0:
        raise ValueError(f"fasttx.{_OP}: x must have at least 1 dimension (..., d_model), got a 0-d tensor")
    d_model = x.shape[-1]
    if w_gate.dim() != 2 or w_gate.shape[1] != d_model:
        raise ValueError(f"fasttx.{_OP}: w_gate must have shape (d_hidden, {d_model}) to match the last dimension "
                         f"of x {tuple(x.shape)}, got {tuple(w_gate.shape)}")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"fasttx.{_OP}: w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    if w_down.dim() != 2 or w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"fasttx.{_OP}: w_down must have shape (d_out, {w_gate.shape[0]}) to match w_gate "
                         f"{tuple(w_gate.shape)}, got {tuple(w_down.shape)}")
    for name, t, size in (("b_gate", b_gate, w_gate.shape[0]), ("b_up", b_up, w_gate.shape[0]),
                          ("b_down", b_down, w_down.shape[0])):
        if t is None:
            continue
        check_tensor(_OP, name, t)
        if t.shape != (size,):
            raise ValueError(f"fasttx.{_OP}: {name} must have shape ({size},), got {tuple(t.shape)}")
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("b_gate", b_gate), ("b_up", b_up),
                    ("b_down", b_down)):
        if t is not None:
            check_same(_OP, name, t, "x", x)


def glu_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str = "silu",
            b_gate: Optional[Tensor] = None, b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None) -> Tensor:
    """``linear(act(linear(x, w_gate, b_gate)) * linear(x, w_up, b_up), w_down, b_down)``: LLaMA's MLP.

    Weights in nn.Linear's layout: w_gate and w_up (d_hidden, d_model), w_down (d_out, d_hidden).
    ``activation`` is ``"silu"`` (SwiGLU), ``"gelu"`` (exact erf, GeGLU) or ``"gelu_tanh"``
    (Gemma's). Saved for backward: x and the two pre-activations, never act(gate) * up; recomputing
    gate and up instead would cost 2 of the op's ~9 GEMM-units, keeping them costs 2 M d_hidden.
    """
    x, w_gate, w_up, w_down, b_gate, b_up, b_down = lower_precision(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    _check(x, w_gate, w_up, w_down, activation, b_gate, b_up, b_down)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()  # not -1: d_model may be 0
    c = lambda t: t.contiguous() if t is not None else None
    args = (rows, c(w_gate), c(b_gate), c(w_up), c(b_up), c(w_down), c(b_down), activation,
            backends.requested_backend())
    if plain_eager(*args[:7]):
        out = _GluFFNFunction.apply(*args)[0]
    elif under_transform():
        out = _torch_forward(*args[:-1])[0]
    else:
        out = _glu_ffn_forward_op(*args)[0]
    return out.view(*x.shape[:-1], w_down.shape[0])
