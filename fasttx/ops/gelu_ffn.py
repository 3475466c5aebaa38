"""gelu_ffn: the Transformer feed-forward block, linear(act(linear(x, w1, b1)), w2, b2), fused.

Eager ``fc2(gelu(fc1(x)))`` writes the 4d-wide intermediate as the GEMM's
output, reads it for the activation, writes the activation, and keeps both
for backward. Here the bias and the activation are the first GEMM's epilogue,
only the pre-activation is kept, and the backward recomputes the activation
(one elementwise pass) instead of storing it: for x of width d and a hidden
width of 4d, the activations saved per token fall from d + 8d to d + 4d.

Backends: triton (a tiled matmul with the epilogues), cuda (cuBLASLt and its
bias/GELU epilogues), cpu (ATen's BLAS plus vectorized epilogue passes) and
torch, the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops._autocast import lower_precision
from fasttx.ops._checks import check_choice, check_float, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
_ACTIVATION_CODE = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # csrc/common/activation.h Activation
_OP = "gelu_ffn"


# ---- reference: plain PyTorch ---------------------------------------------------

def activation_ref(z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def gelu_ffn_ref(x, w1, b1, w2, b2, activation="gelu"):
    return F.linear(activation_ref(F.linear(x, w1, b1), activation), w2, b2)


# ---- the torch backend: the kernels' contract in PyTorch (rows x: (M, D)) ------------

def _activation_grad(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if activation == "gelu_tanh" else "none")


def _column_sum(t: Tensor) -> Tensor:
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(0, dtype=acc).to(t.dtype)


def _torch_forward(x, w1, b1, w2, b2, activation):
    preact = F.linear(x, w1, b1)
    return F.linear(activation_ref(preact, activation), w2, b2), preact


def _torch_backward(grad_out, x, preact, w1, w2, has_b1, has_b2, activation):
    # Differentiable torch ops: with preact recomputed, also the backward that autograd records.
    grad_h = _activation_grad(grad_out @ w2, preact, activation)
    grad_w2 = grad_out.t() @ activation_ref(preact, activation)
    return (grad_h @ w1, grad_h.t() @ x, _column_sum(grad_h) if has_b1 else None, grad_w2,
            _column_sum(grad_out) if has_b2 else None)


# ---- the other backends ---------------------------------------------------------

def _cpu_forward(x, w1, b1, w2, b2, activation):
    return backends.extension().gelu_ffn_fwd_cpu(x, w1, b1, w2, b2, _ACTIVATION_CODE[activation])


def _cpu_backward(grad_out, x, preact, w1, w2, has_b1, has_b2, activation):
    return backends.extension().gelu_ffn_bwd_cpu(grad_out, x, preact, w1, w2, has_b1, has_b2,
                                                 _ACTIVATION_CODE[activation])


def _cuda_forward(x, w1, b1, w2, b2, activation):
    return backends.extension().gelu_ffn_fwd_cuda(x, w1, b1, w2, b2, _ACTIVATION_CODE[activation])


def _cuda_backward(grad_out, x, preact, w1, w2, has_b1, has_b2, activation):
    return backends.extension().gelu_ffn_bwd_cuda(grad_out, x, preact, w1, w2, has_b1, has_b2,
                                                  _ACTIVATION_CODE[activation])


def _triton_forward(*args):
    from fasttx.kernels import gelu_ffn as k
    return k.gelu_ffn_forward(*args)


def _triton_backward(*args):
    from fasttx.kernels import gelu_ffn as k
    return k.gelu_ffn_backward(*args)


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


def _forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str,
             backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, x)
    if 0 in (*x.shape, *w1.shape, w2.shape[0]):  # nothing for a kernel to do; the contract still holds
        impl = IMPLEMENTATIONS[-1]
    return tuple(impl.forward(x, w1, b1, w2, b2, activation))


def _backward(grad_out: Tensor, x: Tensor, preact: Tensor, w1: Tensor, w2: Tensor, has_b1: bool, has_b2: bool,
              activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, x)
    if 0 in (*x.shape, *w1.shape, w2.shape[0]):
        impl = IMPLEMENTATIONS[-1]
    grads = impl.backward(grad_out.contiguous(), x, preact, w1, w2, has_b1, has_b2, activation)
    return tuple(g if g is not None else _empty(x) for g in grads)


@torch.library.custom_op("fasttx::gelu_ffn_forward", mutates_args=())
def _gelu_ffn_forward_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                         activation: str, backend: str) -> tuple[Tensor, Tensor]:
    return _forward(x, w1, b1, w2, b2, activation, backend)


@_gelu_ffn_forward_op.register_fake
def _(x, w1, b1, w2, b2, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("fasttx::gelu_ffn_backward", mutates_args=())
def _gelu_ffn_backward_op(grad_out: Tensor, x: Tensor, preact: Tensor, w1: Tensor, w2: Tensor, has_b1: bool,
                          has_b2: bool, activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(grad_out, x, preact, w1, w2, has_b1, has_b2, activation, backend)


@_gelu_ffn_backward_op.register_fake
def _(grad_out, x, preact, w1, w2, has_b1, has_b2, activation, backend):
    bias_grad = lambda has, n: x.new_empty(n) if has else _empty(x)
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), bias_grad(has_b1, w1.shape[0]), w2.new_empty(w2.shape),
            bias_grad(has_b2, w2.shape[0]))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, backend = inputs
    ctx.save_for_backward(x, output[1], w1, w2, b1)  # never the activation: the backward recomputes it
    ctx.has_b1, ctx.has_b2, ctx.activation, ctx.backend = b1 is not None, b2 is not None, activation, backend
    ctx.mark_non_differentiable(output[1])
    # preact never has a gradient: without this autograd would hand the backward a (M, d_hidden) tensor of
    # zeros, allocated and filled on every call (the largest allocation of the reference GPT's backward).
    ctx.set_materialize_grads(False)


def _autograd_backward(backward):
    def run(ctx, grad_out, _grad_preact):
        if grad_out is None:  # the output did not reach the loss
            return None, None, None, None, None, None, None
        x, preact, w1, w2, b1 = ctx.saved_tensors
        if graphed_backward():  # create_graph=True: the saved preact carries no graph, so it is recomputed
            grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = _torch_backward(
                grad_out, x, F.linear(x, w1, b1), w1, w2, ctx.has_b1, ctx.has_b2, ctx.activation)
        else:
            grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = backward(grad_out, x, preact, w1, w2, ctx.has_b1,
                                                                  ctx.has_b2, ctx.activation, ctx.backend)
        return (grad_x, grad_w1, grad_b1 if ctx.has_b1 else None, grad_w2, grad_b2 if ctx.has_b2 else None,
                None, None)
    return run


_gelu_ffn_forward_op.register_autograd(_autograd_backward(_gelu_ffn_backward_op), setup_context=_setup_context)
_GeluFFNFunction = eager_function("_GeluFFNFunction", _forward, _setup_context, _autograd_backward(_backward))


# ---- public API ---------------------------------------------------------------

def _check(x, w1, b1, w2, b2, activation):
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        check_tensor(_OP, name, t)
    check_float(_OP, "x", x)
    check_choice(_OP, "activation", activation, ACTIVATIONS)
    if x.dim() == 0:
        raise ValueError(f"fasttx.{_OP}: x must have at least 1 dimension (..., d_model), got a 0-d tensor")
    d_model = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != d_model:
        raise ValueError(f"fasttx.{_OP}: w1 must have shape (d_hidden, {d_model}) to match the last dimension of x "
                         f"{tuple(x.shape)}, got {tuple(w1.shape)}")
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"fasttx.{_OP}: w2 must have shape (d_out, {w1.shape[0]}) to match w1 {tuple(w1.shape)}, "
                         f"got {tuple(w2.shape)}")
    for name, t, size in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if t is None:
            continue
        check_tensor(_OP, name, t)
        if t.shape != (size,):
            raise ValueError(f"fasttx.{_OP}: {name} must have shape ({size},), got {tuple(t.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None:
            check_same(_OP, name, t, "x", x)


def gelu_ffn(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
             activation: str = "gelu") -> Tensor:
    """``linear(act(linear(x, w1, b1)), w2, b2)``, weights in nn.Linear's layout.

    ``activation`` is ``"gelu"`` (erf), ``"gelu_tanh"`` or ``"relu"``. Saves x,
    the pre-activation and the weights for backward, never the activation.
    """
    x, w1, b1, w2, b2 = lower_precision(x, w1, b1, w2, b2)  # as autocast runs torch's two linears
    _check(x, w1, b1, w2, b2, activation)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()  # not -1: d_model may be 0
    args = (rows, w1.contiguous(), b1.contiguous() if b1 is not None else None, w2.contiguous(),
            b2.contiguous() if b2 is not None else None, activation, backends.requested_backend())
    if plain_eager(*args[:5]):
        out, _ = _GeluFFNFunction.apply(*args)
    elif under_transform():
        out, _ = _torch_forward(*args[:-1])
    else:
        out, _ = _gelu_ffn_forward_op(*args)
    return out.view(*x.shape[:-1], w2.shape[0])
