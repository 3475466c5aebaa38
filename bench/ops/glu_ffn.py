"""glu_ffn: out = down(act(gate(x)) * up(x)), LLaMA's MLP: x (M, d), hidden width h, no biases.

Compute-bound: reported in GFLOP/s against the machine's GEMM in the same run, and against its
own GEMMs alone ("gemms", the bound the issue holds it to), timed in the same interleaved rounds.

    fwd      gate, up, down                                       = 3 * 2*M*d*h FLOPs
    fwd+bwd  + grad_prod, grad_w_down, grad_w_gate, grad_w_up,
               and grad_x's two GEMMs                             = 9 * 2*M*d*h FLOPs

The elementwise work (activation, product, their gradients) is left out of the count.

"gemms" is a provider that runs exactly those GEMMs (3 forward, 6 backward, through an
autograd.Function) and no elementwise pass: the product is replaced by up itself and grad_up by
gate, so its output is not the FFN's (its error column says so) but its time is the least any
implementation on these GEMMs can take. "gemms" runs torch's matmuls (ATen's BLAS: the GEMMs
eager runs); "gemms-fasttx", on the CPU, fasttx's CPU GEMM choice (cpu/matmul.h: oneDNN for fp32
on AMD CPUs, else BLAS; the GEMMs fasttx.glu_ffn's cpu backend calls), through fasttx.ops.linear's
entry points (grad_x's two halves then added, one M*d pass). Both are shown because neither
library wins everywhere: on a loaded 2-core AMD EPYC, oneDNN ran x w_gate^T at (512, 2048) x
(2048, 5632) in 482 ms against MKL's 246. Every row gets "vs gemms": the torch-GEMM bound's time
over the row's (1.0 = as fast as the GEMMs alone).

"saved for bwd" leaves out the weights, which every provider keeps: eager keeps x, gate(x),
silu's output, up(x) and the product (d + 4h per token); fasttx keeps x, gate and up (d + 2h).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fasttx
from bench.spec import OpSpec, dtype_of
from fasttx import backends
from fasttx.ops.glu import activation_ref

KEY_CASE = {"tokens": 4096, "d_model": 2048, "d_hidden": 5632, "dtype": "float32", "activation": "silu"}
SMOKE = {"tokens": 64, "d_model": 32, "d_hidden": 88, "dtype": "float32", "activation": "silu"}


def case(tokens, d_model, d_hidden, dtype="float32", activation="silu") -> dict:
    return {"tokens": tokens, "d_model": d_model, "d_hidden": d_hidden, "dtype": dtype, "activation": activation}


def sweep(level: str) -> list:
    if level == "smoke":
        return [dict(SMOKE)]
    cases = [dict(KEY_CASE), case(4096, 2048, 5632, "bfloat16")]
    if level == "full":
        cases += [case(4096, 2048, 5632, activation="gelu_tanh"), case(2048, 1024, 2816)]
    return cases


def make_inputs(c: dict, device: torch.device) -> tuple:
    dtype, m, d, h = dtype_of(c["dtype"]), c["tokens"], c["d_model"], c["d_hidden"]
    make = lambda *shape, scale=1.0: (scale * torch.randn(*shape, device=device)).to(dtype)
    return make(m, d), make(h, d, scale=d ** -0.5), make(h, d, scale=d ** -0.5), make(d, h, scale=h ** -0.5)


def eager(c: dict):
    activation = c["activation"]

    def glu_ffn_eager(x, w_gate, w_up, w_down):  # down(act(gate(x)) * up(x)), as LlamaMLP writes it
        return F.linear(activation_ref(F.linear(x, w_gate), activation) * F.linear(x, w_up), w_down)
    return glu_ffn_eager


def fasttx_fn(c: dict):
    activation = c["activation"]
    return lambda x, w_gate, w_up, w_down: fasttx.glu_ffn(x, w_gate, w_up, w_down, activation)


# ---- the bound: the op's nine GEMMs and nothing else --------------------------------

def _fasttx_gemms(x):
    return x.device.type == "cpu" and backends.extension() is not None


def _linear(x, w, fasttx_gemms):
    """x w^T on the GEMMs fasttx's CPU backend uses, or torch's."""
    if fasttx_gemms and _fasttx_gemms(x):
        return backends.extension().linear_fwd_cpu(x, w, None)
    return x @ w.t()


def _linear_grads(grad_out, x, w, fasttx_gemms):
    """(grad_out w, grad_out^T x): a linear's two backward GEMMs."""
    if fasttx_gemms and _fasttx_gemms(x):
        grad_x, grad_w, _ = backends.extension().linear_bwd_cpu(grad_out, x, w, True, True, False)
        return grad_x, grad_w
    return grad_out @ w, grad_out.t() @ x


class _GemmsOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, fasttx_gemms):
        gate, up = _linear(x, w_gate, fasttx_gemms), _linear(x, w_up, fasttx_gemms)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        ctx.fasttx_gemms = fasttx_gemms
        return _linear(up, w_down, fasttx_gemms)  # up stands in for act(gate) * up: no elementwise pass

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        f = ctx.fasttx_gemms
        grad_prod, grad_w_down = _linear_grads(grad_out.contiguous(), up, w_down, f)
        grad_x, grad_w_gate = _linear_grads(grad_prod, x, w_gate, f)  # grad_prod stands in for grad_gate
        if f and _fasttx_gemms(x):
            grad_x_up, grad_w_up = _linear_grads(gate, x, w_up, f)      # and gate for grad_up
            grad_x = grad_x.add_(grad_x_up)
        else:  # grad_x += gate w_up inside the GEMM (beta = 1), as the cpu backend's accumulating GEMM
            grad_x, grad_w_up = torch.addmm(grad_x, gate, w_up), gate.t() @ x
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None


def gemms_bound(c: dict):
    return lambda x, w_gate, w_up, w_down: _GemmsOnly.apply(x, w_gate, w_up, w_down, False)


def gemms_fasttx_bound(c: dict):
    return lambda x, w_gate, w_up, w_down: _GemmsOnly.apply(x, w_gate, w_up, w_down, True)


def flops(c: dict, mode: str) -> int:
    gemm = 2 * c["tokens"] * c["d_model"] * c["d_hidden"]
    return (3 if mode == "fwd" else 9) * gemm


SPEC = OpSpec(
    name="glu_ffn",
    params=("tokens", "d_model", "d_hidden", "dtype", "activation"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    flops=flops,
    formula="GEMM FLOPs: fwd = 3 x 2*M*d*h; fwd+bwd = 9 x 2*M*d*h; elementwise work not counted. "
            "'gemms' = those GEMMs alone on torch's matmuls, no elementwise pass (its output is not the FFN's): "
            "the bound; 'gemms-fasttx' = the same on fasttx's CPU GEMM choice. "
            "Saved for bwd: activations only (weights, kept by all, left out); x counts",
    grad_inputs=(0, 1, 2, 3),
    saved_excludes=(1, 2, 3),
    table_by=("dtype",),
    is_key_case=lambda c: c == KEY_CASE,
    torch_providers=(("gemms", gemms_bound), ("gemms-fasttx", gemms_fasttx_bound)),
    compare_to="gemms",
)
