"""bias_gelu: y = gelu(x + bias) over the last dimension, fused.

Eager PyTorch writes x + bias, then reads it back for GELU, and keeps it for
backward. The fused op reads x and bias once and writes y once; its backward
recomputes x + bias from the inputs it already holds and reduces grad_bias in
the same pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops._autocast import promoted
from fasttx.ops._checks import check_choice, check_float, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

APPROXIMATIONS = ("none", "tanh")
_OP = "bias_gelu"


# ---- reference: plain PyTorch, the truth every backend is tested against ------

def bias_gelu_ref(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(x + bias, approximate=approximate)


def _torch_forward(x2d, bias, approximate):
    return bias_gelu_ref(x2d, bias, approximate)


def _torch_backward(grad, x, bias, approximate):
    # Differentiable torch ops on x of any shape: also the backward that autograd records (create_graph=True).
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = (x + bias).to(acc)
    grad_x = torch.ops.aten.gelu_backward(grad.to(acc), z, approximate=approximate)
    return grad_x.to(x.dtype), grad_x.sum_to_size(bias.shape).to(bias.dtype)


# ---- the other backends ---------------------------------------------------------

_APPROX_CODE = {"none": 0, "tanh": 1}  # csrc/common/gelu.h GeluApprox


def _cpu_forward(x2d, bias, approximate):
    return backends.extension().bias_gelu_fwd_cpu(x2d, bias, _APPROX_CODE[approximate])


def _cpu_backward(grad2d, x2d, bias, approximate):
    return tuple(backends.extension().bias_gelu_bwd_cpu(grad2d, x2d, bias, _APPROX_CODE[approximate]))


def _cuda_forward(x2d, bias, approximate):
    return backends.extension().bias_gelu_fwd_cuda(x2d, bias, _APPROX_CODE[approximate])


def _cuda_backward(grad2d, x2d, bias, approximate):
    return tuple(backends.extension().bias_gelu_bwd_cuda(grad2d, x2d, bias, _APPROX_CODE[approximate]))


def _triton_forward(x2d, bias, approximate):
    from fasttx.kernels import bias_gelu as k
    return k.bias_gelu_forward(x2d, bias, approximate)


def _triton_backward(grad2d, x2d, bias, approximate):
    from fasttx.kernels import bias_gelu as k
    return k.bias_gelu_backward(grad2d, x2d, bias, approximate)


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.device_only("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


# ---- forward and backward: the bodies of the custom ops -----------------------------

def _forward(x: Tensor, bias: Tensor, approximate: str, backend: str) -> Tensor:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, x, bias)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    x2d = x.contiguous().view(-1, x.shape[-1])
    return impl.forward(x2d, bias.contiguous(), approximate).view(x.shape)


def _backward(grad: Tensor, x: Tensor, bias: Tensor, approximate: str, backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, x, bias)
    if x.numel() == 0:
        return x.new_empty(x.shape), torch.zeros_like(bias)
    n = x.shape[-1]
    grad_x, grad_bias = impl.backward(grad.contiguous().view(-1, n), x.contiguous().view(-1, n),
                                      bias.contiguous(), approximate)
    return grad_x.view(x.shape), grad_bias


# ---- torch.library registration: opaque to torch.compile, with autograd -----------

@torch.library.custom_op("fasttx::bias_gelu", mutates_args=())
def _bias_gelu_op(x: Tensor, bias: Tensor, approximate: str, backend: str) -> Tensor:
    return _forward(x, bias, approximate, backend)


@_bias_gelu_op.register_fake
def _(x, bias, approximate, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fasttx::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(grad: Tensor, x: Tensor, bias: Tensor, approximate: str,
                           backend: str) -> tuple[Tensor, Tensor]:
    return _backward(grad, x, bias, approximate, backend)


@_bias_gelu_backward_op.register_fake
def _(grad, x, bias, approximate, backend):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _autograd_backward(backward):
    def run(ctx, grad):
        x, bias = ctx.saved_tensors
        if graphed_backward():
            grad_x, grad_bias = _torch_backward(grad, x, bias, ctx.approximate)
        else:
            grad_x, grad_bias = backward(grad, x, bias, ctx.approximate, ctx.backend)
        return grad_x, grad_bias, None, None
    return run


_bias_gelu_op.register_autograd(_autograd_backward(_bias_gelu_backward_op), setup_context=_setup_context)
_BiasGeluFunction = eager_function("_BiasGeluFunction", _forward, _setup_context, _autograd_backward(_backward))


# ---- public API ---------------------------------------------------------------

def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(x + bias, approximate)`` with ``bias`` of shape ``(x.shape[-1],)``, in one pass.

    Same result as ``torch.nn.functional.gelu(x + bias, approximate=approximate)``
    for x and bias of one floating dtype and device.
    """
    check_tensor(_OP, "x", x)
    check_tensor(_OP, "bias", bias)
    x, bias = promoted(x, bias)  # autocast: x + bias in the promoted dtype, as torch adds them
    check_float(_OP, "x", x)
    check_same(_OP, "bias", bias, "x", x)
    check_choice(_OP, "approximate", approximate, APPROXIMATIONS)
    if x.dim() == 0:
        raise ValueError(f"fasttx.{_OP}: x must have at least 1 dimension, got a 0-d tensor")
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(f"fasttx.{_OP}: bias must have shape ({x.shape[-1]},) to match the last dimension "
                         f"of x {tuple(x.shape)}, got {tuple(bias.shape)}")
    args = (x, bias, approximate, backends.requested_backend())
    if plain_eager(x, bias):
        return _BiasGeluFunction.apply(*args)
    return _torch_forward(*args[:-1]) if under_transform() else _bias_gelu_op(*args)
