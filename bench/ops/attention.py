"""scaled_dot_product_attention: q, k, v of shape (B, H, T, D), causal and not.

Compute-bound: reported in GFLOP/s against the machine's GEMM in the same run.

    fwd      QK^T and PV                  = 4*B*H*Tq*Tk*D FLOPs, halved when causal
    fwd+bwd  + recomputed QK^T, dV, dP, dQ, dK = 2.5x more: 3.5 x fwd

Providers beyond fasttx: "eager" is the math a user writes,
softmax(q k^T * scale [+ causal mask]) v, which keeps the T x T probabilities
for backward; "sdpa" is torch.nn.functional.scaled_dot_product_attention,
PyTorch's own fused (on CPU: flash) kernel, and every row's "vs sdpa" ratio is
paired against it. "saved for bwd" counts what autograd keeps beyond q, k, v.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fasttx
from bench.spec import OpSpec, dtype_of

SMOKE = {"batch": 1, "heads": 2, "seq": 64, "head_dim": 16, "dtype": "float32", "causal": False}


def case(batch, heads, seq, head_dim=64, dtype="float32", causal=False) -> dict:
    return {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "dtype": dtype, "causal": causal}


def is_key_case(c: dict) -> bool:
    return (c["batch"], c["heads"], c["head_dim"], c["dtype"]) == (4, 12, 64, "float32") and c["seq"] in (
        512, 1024, 2048) or (c["dtype"] == "bfloat16" and c["causal"])


def sweep(level: str) -> list:
    if level == "smoke":
        return [dict(SMOKE)]
    seqs = (512, 1024, 2048) if level == "full" else (1024,)
    cases = [case(4, 12, t, causal=c) for t in seqs for c in (False, True)]
    cases += [case(8, 6, 256, dtype="bfloat16", causal=True)]
    if level == "full":
        cases += [case(4, 12, 1024, dtype="bfloat16", causal=True)]
    return cases


def leave_out(c: dict, threads: int, allocator: str):
    """Attention is compute-bound, and a T = 2048 round takes ~15 s on 2 cores with every provider:
    the long cases run once, where the issue measures them (2 threads, glibc)."""
    work = c["batch"] * c["heads"] * c["seq"] ** 2
    if threads < 2 and work > 4 * 12 * 1024 ** 2:
        return "the longest cases run at 2 threads only, to keep make bench near an hour"
    if allocator != "glibc" and work > 4 * 12 * 512 ** 2:
        return "past T = 512 under glibc only: compute-bound, and T = 512 shows the allocator's effect"
    return None


def make_inputs(c: dict, device: torch.device) -> tuple:
    shape = (c["batch"], c["heads"], c["seq"], c["head_dim"])
    return tuple(torch.randn(shape, device=device).to(dtype_of(c["dtype"])) for _ in range(3))


def eager(c: dict):
    causal = c["causal"]

    def attention_math(q, k, v):  # what a user writes without a fused kernel
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        if causal:
            t = s.shape[-1]
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v
    return attention_math


def sdpa(c: dict):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=c["causal"])


def fasttx_fn(c: dict):
    return lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, is_causal=c["causal"])


def flops(c: dict, mode: str) -> int:
    fwd = 4 * c["batch"] * c["heads"] * c["seq"] ** 2 * c["head_dim"] // (2 if c["causal"] else 1)
    return fwd if mode == "fwd" else int(3.5 * fwd)


SPEC = OpSpec(
    name="attention",
    params=("batch", "heads", "seq", "head_dim", "dtype", "causal"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    flops=flops,
    formula="FLOPs: fwd = 4*B*H*T^2*D (halved when causal); fwd+bwd = 3.5 x fwd. eager = math attention "
            "softmax(q k^T scale) v; sdpa = F.scaled_dot_product_attention. Saved for bwd: beyond q, k, v",
    grad_inputs=(0, 1, 2),
    saved_excludes=(0, 1, 2),
    table_by=("dtype", "causal"),
    is_key_case=is_key_case,
    torch_providers=(("sdpa", sdpa),),
    compare_to="sdpa",
    leave_out=leave_out,
)
