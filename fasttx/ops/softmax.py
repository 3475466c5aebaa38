"""softmax: the fused scale + mask + softmax of attention scores, over the last dim.

Eager ``torch.softmax(x * scale + mask, -1)`` makes three passes over the
Tq x Tk scores and writes two temporaries; fused it reads x once and writes y
once. A row whose scores are all masked gives 0 (as torch's SDPA does), never
NaN. This is the softmax the cuda attention backend wraps in cuBLAS GEMMs.

Backends: triton, cuda (a warp per row), cpu (at::vec) and torch, the
reference. The contract is stated above softmax_fwd_cpu in csrc/ops.h.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fasttx import backends
from fasttx.ops._checks import check_bool, check_float, check_real, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform
from fasttx.ops.attention import _acc_dtype, _additive_mask, causal_mask

_OP = "softmax"


# ---- reference: plain PyTorch ---------------------------------------------------

def softmax_ref(x, scale=1.0, attn_mask=None, is_causal=False):
    s = x * scale
    if attn_mask is not None:
        s = s + attn_mask if attn_mask.dtype != torch.bool else s.masked_fill(~attn_mask, float("-inf"))
    if is_causal:
        s = s.masked_fill(~causal_mask(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    y = torch.softmax(s, -1)
    return torch.where(torch.isneginf(s).all(-1, keepdim=True), 0.0, y).to(x.dtype)


# ---- the torch backend: the kernels' contract in PyTorch --------------------------

def _torch_forward(x, scale, mask, is_causal):
    s = x.to(_acc_dtype(x.dtype)) * scale
    if mask is not None:
        s = s + mask
    if is_causal:
        s = s.masked_fill(~causal_mask(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # nothing to attend to: 0, not NaN
    return torch.exp(s - lse).to(x.dtype)


def _torch_backward(grad_y, y, scale):
    # Differentiable in grad_y and y: also the backward that autograd records (create_graph=True).
    acc = _acc_dtype(y.dtype)
    g, ya = grad_y.to(acc), y.to(acc)
    return (ya * (g - (g * ya).sum(-1, keepdim=True)) * scale).to(y.dtype)


def _cpu_forward(*args):
    return backends.extension().softmax_fwd_cpu(*args)


def _cpu_backward(*args):
    return backends.extension().softmax_bwd_cpu(*args)


def _cuda_forward(*args):
    return backends.extension().softmax_fwd_cuda(*args)


def _cuda_backward(*args):
    return backends.extension().softmax_bwd_cuda(*args)


def _triton_forward(*args):
    from fasttx.kernels import softmax as k
    return k.softmax_forward(*args)


def _triton_backward(*args):
    from fasttx.kernels import softmax as k
    return k.softmax_backward(*args)


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.device_only("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


def _forward(x: Tensor, scale: float, mask: Optional[Tensor], is_causal: bool, backend: str) -> Tensor:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, x)
    if x.numel() == 0:
        impl = IMPLEMENTATIONS[-1]
    return impl.forward(x, scale, mask, is_causal)


def _backward(grad_y: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, y)
    if y.numel() == 0:
        impl = IMPLEMENTATIONS[-1]
    return impl.backward(grad_y.contiguous(), y, scale)


@torch.library.custom_op("fasttx::softmax_forward", mutates_args=())
def _softmax_forward_op(x: Tensor, scale: float, mask: Optional[Tensor], is_causal: bool, backend: str) -> Tensor:
    return _forward(x, scale, mask, is_causal, backend)


@_softmax_forward_op.register_fake
def _(x, scale, mask, is_causal, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fasttx::softmax_backward", mutates_args=())
def _softmax_backward_op(grad_y: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    return _backward(grad_y, y, scale, backend)


@_softmax_backward_op.register_fake
def _(grad_y, y, scale, backend):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, scale, mask, is_causal, backend = inputs
    ctx.save_for_backward(output)  # the softmax's gradient needs only its output
    ctx.scale, ctx.backend = scale, backend


def _autograd_backward(backward):
    def run(ctx, grad_y):
        (y,) = ctx.saved_tensors
        grad_x = _torch_backward(grad_y, y, ctx.scale) if graphed_backward() else backward(grad_y, y, ctx.scale,
                                                                                           ctx.backend)
        return grad_x, None, None, None, None
    return run


_softmax_forward_op.register_autograd(_autograd_backward(_softmax_backward_op), setup_context=_setup_context)
_SoftmaxFunction = eager_function("_SoftmaxFunction", _forward, _setup_context, _autograd_backward(_backward))


def softmax(x: Tensor, scale: float = 1.0, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """``softmax(x * scale + attn_mask)`` over the last dim of attention scores ``(..., Tq, Tk)``.

    ``attn_mask`` is bool (True = keep) or additive in x's dtype and broadcasts
    to x; ``is_causal`` masks key j > query i (top-left aligned). A row with every
    score masked gives 0. The mask gets no gradient (one that requires it is refused).
    """
    check_tensor(_OP, "x", x)
    check_float(_OP, "x", x)
    if x.dim() < 2:
        raise ValueError(f"fasttx.{_OP}: x must have shape (..., Tq, Tk) with at least 2 dims, got {tuple(x.shape)}")
    check_real(_OP, "scale", scale)
    check_bool(_OP, "is_causal", is_causal)
    tq, tk = x.shape[-2:]
    heads = x.shape[-3] if x.dim() > 2 else 1
    rows = x.reshape(math.prod(x.shape[:-3]), heads, tq, tk).contiguous()
    mask = None
    if attn_mask is not None:
        check_tensor(_OP, "attn_mask", attn_mask)
        if is_causal:
            raise ValueError(f"fasttx.{_OP}: pass either attn_mask or is_causal=True, not both")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != x.dtype:
            raise TypeError(f"fasttx.{_OP}: attn_mask must be bool or have x's dtype {x.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != x.device:
            raise ValueError(f"fasttx.{_OP}: attn_mask is on {attn_mask.device} but x is on {x.device}")
        if attn_mask.requires_grad:
            raise ValueError(f"fasttx.{_OP}: attn_mask requires grad; fasttx computes no gradient for the mask")
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"fasttx.{_OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to x's "
                             f"{tuple(x.shape)}")
        mask = _additive_mask(attn_mask, x).expand(x.shape)
        if mask.stride(-1) != 1 and tk > 1:
            mask = mask.contiguous()
        mask = mask.reshape(rows.shape)
    args = (rows, float(scale), mask, bool(is_causal), backends.requested_backend())
    if plain_eager(rows, mask):
        y = _SoftmaxFunction.apply(*args)
    else:
        y = _torch_forward(*args[:-1]) if under_transform() else _softmax_forward_op(*args)
    return y.view(x.shape)
