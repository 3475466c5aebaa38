"""glu Triton kernels: y = act(gate) * up and its backward, over flat contiguous tensors.

The math is csrc/common/activation.h's (GELU from bias_gelu's _gelu_and_grad), in fp32 for every
storage dtype, rounded once. Both kernels are memory bound (forward: 2 reads, 1 write; backward:
3 reads, 2 writes), so each program takes one BLOCK of the flat range: no row or column structure,
no masks but the last block's. glu_ffn's kernels (kernels/glu_ffn.py) reuse _glu_act_and_grad in
their epilogues.
"""
import triton
import triton.language as tl
import torch

from .bias_gelu import _gelu_and_grad

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@triton.jit
def _glu_act_and_grad(z, ACTIVATION: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(z), act'(z)) in fp32 for the gated activations; the grad is 0 unless NEED_GRAD."""
    if ACTIVATION == "silu":
        # sigmoid from a = exp(-|z|) in (0, 1]: no overflow for z << 0, and 1 - s without cancellation.
        a = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + a)
        s = tl.where(z >= 0, r, a * r)
        y = z * s
        if NEED_GRAD:
            one_minus_s = tl.where(z >= 0, a * r, r)
            dy = s * (1.0 + z * one_minus_s)
        else:
            dy = 0.0
    else:
        y, dy = _gelu_and_grad(z, ACTIVATION == "gelu_tanh", NEED_GRAD)
    return y, dy


@triton.jit
def _glu_fwd_kernel(GATE, UP, Y, numel, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2^31
    mask = offs < numel
    z = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _glu_act_and_grad(z, ACTIVATION, False)
    tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(G, GATE, UP, DGATE, DUP, numel, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _glu_act_and_grad(z, ACTIVATION, True)
    tl.store(DGATE + offs, (g * u * da).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (g * a).to(DUP.dtype.element_ty), mask=mask)


# ---- dispatcher: one config (memory bound; 8 elements per thread = one 16-byte fp16 load) ----

CONFIG = dict(BLOCK=2048, num_warps=8)
# Every config the dispatcher can pick; tests/test_triton_aot_glu.py compiles each of them.
CONFIGS = (CONFIG,)


def _check(*tensors):
    first = tensors[0]
    assert first.dtype in (torch.float16, torch.bfloat16, torch.float32), first.dtype
    for t in tensors:
        assert t.is_contiguous() and t.dtype == first.dtype and t.device == first.device and t.shape == first.shape


def glu_forward(gate, up, activation):
    _check(gate, up)
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _glu_fwd_kernel[(triton.cdiv(n, CONFIG["BLOCK"]),)](gate, up, y, n, ACTIVATION=activation, **CONFIG)
    return y


def glu_backward(grad, gate, up, activation):
    """(grad_gate, grad_up)."""
    _check(grad, gate, up)
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _glu_bwd_kernel[(triton.cdiv(n, CONFIG["BLOCK"]),)](grad, gate, up, grad_gate, grad_up, n,
                                                             ACTIVATION=activation, **CONFIG)
    return grad_gate, grad_up
