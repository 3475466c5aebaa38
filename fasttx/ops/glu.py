"""glu: y = act(gate) * up, elementwise: the gated unit of SwiGLU (silu) and GeGLU (gelu) feed-forwards.

Eager PyTorch writes act(gate), reads it back for the product and keeps it
for backward next to gate and up. The fused op reads gate and up once and
writes y once (fp32 math, one rounding); its backward keeps only gate and up
and recomputes act(gate) and act'(gate) in the one pass that writes both
gradients.

gate and up must have one shape (no broadcasting: a gated feed-forward's two
projections always agree, and a silent broadcast would hide a wrong split).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops._autocast import promoted
from fasttx.ops._checks import check_choice, check_float, check_same, check_tensor
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager, under_transform

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ACTIVATION_CODE = {"gelu": 0, "gelu_tanh": 1, "silu": 3}  # csrc/common/activation.h Activation
_OP = "glu"


# ---- reference: plain PyTorch, the truth every backend is tested against ------

def activation_ref(z: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_grad_ref(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    """grad * act'(z), in twice-differentiable torch ops (aten.silu_backward has no derivative of its own)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return grad * (s * (1 + z * (1 - s)))
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if activation == "gelu_tanh" else "none")


def glu_ref(gate: Tensor, up: Tensor, activation: str = "silu") -> Tensor:
    return activation_ref(gate, activation) * up


def _torch_forward(gate, up, activation):
    return glu_ref(gate, up, activation)


def _torch_backward(grad, gate, up, activation):
    # Differentiable torch ops on tensors of any shape: also the backward that autograd records (create_graph=True).
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, z, u = grad.to(acc), gate.to(acc), up.to(acc)
    grad_gate = activation_grad_ref(g * u, z, activation)
    grad_up = g * activation_ref(z, activation)
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


# ---- the other backends: flat contiguous tensors ----------------------------------

def _cpu_forward(gate, up, activation):
    return backends.extension().glu_fwd_cpu(gate, up, ACTIVATION_CODE[activation])


def _cpu_backward(grad, gate, up, activation):
    return tuple(backends.extension().glu_bwd_cpu(grad, gate, up, ACTIVATION_CODE[activation]))


def _cuda_forward(gate, up, activation):
    return backends.extension().glu_fwd_cuda(gate, up, ACTIVATION_CODE[activation])


def _cuda_backward(grad, gate, up, activation):
    return tuple(backends.extension().glu_bwd_cuda(grad, gate, up, ACTIVATION_CODE[activation]))


def _triton_forward(gate, up, activation):
    from fasttx.kernels import glu as k
    return k.glu_forward(gate, up, activation)


def _triton_backward(grad, gate, up, activation):
    from fasttx.kernels import glu as k
    return k.glu_backward(grad, gate, up, activation)


IMPLEMENTATIONS = (
    backends.Implementation("triton", _triton_forward, _triton_backward, backends.triton_why_not),
    backends.Implementation("cuda", _cuda_forward, _cuda_backward, backends.up_to_float32("cuda")),
    backends.Implementation("cpu", _cpu_forward, _cpu_backward, backends.device_only("cpu")),
    backends.Implementation("torch", _torch_forward, _torch_backward, backends.device_only("torch")),
)


# ---- forward and backward: the bodies of the custom ops -----------------------------

def _forward(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, gate, up)
    if gate.numel() == 0:
        return gate.new_empty(gate.shape)
    return impl.forward(gate.contiguous(), up.contiguous(), activation).view(gate.shape)


def _backward(grad: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.choose(_OP, IMPLEMENTATIONS, backend, gate, up)
    if gate.numel() == 0:
        return gate.new_empty(gate.shape), up.new_empty(up.shape)
    grad_gate, grad_up = impl.backward(grad.contiguous(), gate.contiguous(), up.contiguous(), activation)
    return grad_gate.view(gate.shape), grad_up.view(up.shape)


# ---- torch.library registration: opaque to torch.compile, with autograd -----------

@torch.library.custom_op("fasttx::glu", mutates_args=())
def _glu_op(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    return _forward(gate, up, activation, backend)


@_glu_op.register_fake
def _(gate, up, activation, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fasttx::glu_backward", mutates_args=())
def _glu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    return _backward(grad, gate, up, activation, backend)


@_glu_backward_op.register_fake
def _(grad, gate, up, activation, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.save_for_backward(gate, up)  # never act(gate) or the product: the backward recomputes act(gate)
    ctx.activation, ctx.backend = activation, backend


def _autograd_backward(backward):
    def run(ctx, grad):
        gate, up = ctx.saved_tensors
        if graphed_backward():
            grad_gate, grad_up = _torch_backward(grad, gate, up, ctx.activation)
        else:
            grad_gate, grad_up = backward(grad, gate, up, ctx.activation, ctx.backend)
        return grad_gate, grad_up, None, None
    return run


_glu_op.register_autograd(_autograd_backward(_glu_backward_op), setup_context=_setup_context)
_GluFunction = eager_function("_GluFunction", _forward, _setup_context, _autograd_backward(_backward))


# ---- public API ---------------------------------------------------------------

def glu(gate: Tensor, up: Tensor, activation: str = "silu") -> Tensor:
    """``act(gate) * up`` in one pass: SwiGLU's (``"silu"``) or GeGLU's (``"gelu"``, exact erf,
    or ``"gelu_tanh"``) gated unit.

    gate and up must have one shape, floating dtype and device (no broadcasting). The backward
    returns (grad_gate, grad_up) and keeps only gate and up, recomputing act(gate).
    """
    check_tensor(_OP, "gate", gate)
    check_tensor(_OP, "up", up)
    gate, up = promoted(gate, up)  # autocast: act(gate) * up in the promoted dtype, as torch multiplies them
    check_float(_OP, "gate", gate)
    check_same(_OP, "up", up, "gate", gate)
    check_choice(_OP, "activation", activation, ACTIVATIONS)
    if gate.shape != up.shape:
        raise ValueError(f"fasttx.{_OP}: gate and up must have the same shape (no broadcasting), got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")
    args = (gate, up, activation, backends.requested_backend())
    if plain_eager(gate, up):
        return _GluFunction.apply(*args)
    return _torch_forward(*args[:-1]) if under_transform() else _glu_op(*args)
