"""gelu_ffn: out = linear(act(linear(x, w1, b1)), w2, b2), x of shape (M, d), hidden width h.

Compute-bound: reported in GFLOP/s against the machine's GEMM in the same run.

    fwd      two GEMMs                          = 2 * 2*M*d*h FLOPs
    fwd+bwd  + grad_a, grad_w2, grad_w1, grad_x = 6 * 2*M*d*h FLOPs

The elementwise work (bias, activation, its gradient) is left out of the
count. "saved for bwd" leaves out the weights, which every provider keeps.
"""
from __future__ import annotations

import torch

import fasttx
from bench.spec import OpSpec, dtype_of
from fasttx.ops.gelu_ffn import gelu_ffn_ref

KEY_CASE = {"tokens": 8192, "d_model": 768, "d_hidden": 3072, "dtype": "float32", "activation": "gelu"}
SMOKE = {"tokens": 64, "d_model": 32, "d_hidden": 128, "dtype": "float32", "activation": "gelu"}


def case(tokens, d_model, d_hidden, dtype="float32", activation="gelu") -> dict:
    return {"tokens": tokens, "d_model": d_model, "d_hidden": d_hidden, "dtype": dtype, "activation": activation}


def sweep(level: str) -> list:
    if level == "smoke":
        return [dict(SMOKE)]
    cases = [dict(KEY_CASE)] + [case(8192, 768, 3072, activation=a) for a in ("gelu_tanh", "relu")]
    if level == "full":
        cases += [case(2048, 1024, 4096), case(2048, 768, 3072, "bfloat16")]
    return cases


def make_inputs(c: dict, device: torch.device) -> tuple:
    dtype, m, d, h = dtype_of(c["dtype"]), c["tokens"], c["d_model"], c["d_hidden"]
    make = lambda *shape, scale=1.0: (scale * torch.randn(*shape, device=device)).to(dtype)
    return (make(m, d), make(h, d, scale=d ** -0.5), make(h), make(d, h, scale=h ** -0.5), make(d))


def eager(c: dict):
    activation = c["activation"]

    def ffn_eager(x, w1, b1, w2, b2):  # fc2(act(fc1(x)))
        return gelu_ffn_ref(x, w1, b1, w2, b2, activation)
    return ffn_eager


def fasttx_fn(c: dict):
    activation = c["activation"]
    return lambda x, w1, b1, w2, b2: fasttx.gelu_ffn(x, w1, b1, w2, b2, activation)


def flops(c: dict, mode: str) -> int:
    gemm = 2 * c["tokens"] * c["d_model"] * c["d_hidden"]
    return (2 if mode == "fwd" else 6) * gemm


SPEC = OpSpec(
    name="gelu_ffn",
    params=("tokens", "d_model", "d_hidden", "dtype", "activation"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    flops=flops,
    formula="GEMM FLOPs: fwd = 2 x 2*M*d*h; fwd+bwd = 6 x 2*M*d*h; elementwise work not counted. "
            "Saved for bwd: activations only (weights, kept by all, left out)",
    grad_inputs=(0, 1, 2, 3, 4),
    saved_excludes=(1, 2, 3, 4),
    table_by=("dtype",),
    is_key_case=lambda c: c == KEY_CASE,
)
