"""linear: ``F.linear``, with its fp32 GEMMs on oneDNN on CPUs where ATen's BLAS is slow.

ATen runs fp32 ``F.linear`` on MKL, whose AVX-512 kernels serve Intel CPUs only:
on 2 cores of an AMD EPYC (Zen 5) it ran the reference GPT's linears at 160-180
GFLOP/s, where oneDNN's matmul, linked into ATen too, ran them at 290-365
(csrc/cpu/matmul.h has the numbers and the rule). fasttx's layers call this
``linear``; it takes fasttx's CPU GEMMs (csrc/cpu/linear.cpp) exactly when they
are not ATen's own:
  - plain eager calls (under torch.compile the compiler picks its own GEMMs),
  - CPU float32 tensors outside autocast (bf16 and half are oneDNN's in ATen already),
  - the extension built and ``onednn_fp32_gemm_enabled()`` (FASTTX_CPU_GEMM),
  - no forced ``torch`` backend (the reference is plain PyTorch).
Everywhere else it is ``F.linear`` itself: on a GPU cuBLAS is the GEMM either way.
A linear is not one of fasttx's kernels, so a forced triton or cuda backend runs
F.linear here rather than raising.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttx import backends
from fasttx.ops._eager import eager_function, graphed_backward, plain_eager

linear_ref = F.linear


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return backends.extension().linear_fwd_cpu(x, weight, bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad
    if graphed_backward():  # create_graph=True: in torch ops, which autograd can differentiate again
        grad_x, grad_w, grad_b = grad_out @ weight, grad_out.t() @ x, grad_out.sum(0)
    else:
        grad_x, grad_w, grad_b = backends.extension().linear_bwd_cpu(grad_out.contiguous(), x, weight, needs_x,
                                                                     needs_w, ctx.has_bias and needs_b)
    return grad_x if needs_x else None, grad_w if needs_w else None, grad_b if ctx.has_bias and needs_b else None


_LinearFunction = eager_function("_LinearFunction", _forward, _setup_context, _backward)


def _takes_fasttx_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    if torch.compiler.is_compiling():  # first: nothing below is for the compiler to trace
        return False
    ext = backends.extension()
    return (ext is not None and isinstance(x, Tensor) and isinstance(weight, Tensor)
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype == torch.float32
                                  and bias.device.type == "cpu" and bias.shape == (weight.shape[0],)))
            and x.dim() >= 1 and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and x.numel() > 0 and weight.numel() > 0
            and not torch.is_autocast_enabled("cpu")
            and plain_eager(x, weight, bias)
            and ext.onednn_fp32_gemm_enabled()
            and backends.requested_backend() != "torch")


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(input, weight, bias)``: same arguments, result and errors (see the module docstring)."""
    if not _takes_fasttx_gemm(input, weight, bias):
        return F.linear(input, weight, bias)
    rows = input.reshape(-1, input.shape[-1])
    return _LinearFunction.apply(rows, weight, bias).view(*input.shape[:-1], weight.shape[0])
