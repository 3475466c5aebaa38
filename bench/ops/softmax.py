"""softmax: softmax(scores * scale) over the last dim of attention scores (B, H, Tq, Tk), causal.

Memory-bound, reported in GB/s against the minimal traffic:

    fwd      reads x, writes y                                   = 2 * numel * elem bytes
    fwd+bwd  fwd, then reads grad_y and y, writes grad_x         = 5 * numel * elem bytes

Eager PyTorch writes x * scale and the masked scores before its softmax reads them.
"""
from __future__ import annotations

import torch

import fasttx
from bench.spec import OpSpec, dtype_of

SCALE = 0.125
FULL_SHAPES = ((4, 12, 512, 512), (4, 12, 1024, 1024), (1, 4, 128, 8192))
SMOKE_SHAPE = (1, 2, 16, 64)
KEY_SHAPE = (4, 12, 1024, 1024)


def case(shape, dtype="float32") -> dict:
    return {"shape": tuple(shape), "dtype": dtype}


def sweep(level: str) -> list:
    if level == "smoke":
        return [case(SMOKE_SHAPE)]
    shapes = FULL_SHAPES if level == "full" else (KEY_SHAPE,)
    return [case(s, d) for d in ("float32", "bfloat16") for s in shapes]


def make_inputs(c: dict, device: torch.device) -> tuple:
    return (torch.randn(c["shape"], dtype=dtype_of(c["dtype"]), device=device),)


def eager(c: dict):
    def softmax_eager(x):
        tq, tk = x.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=x.device).tril()
        return torch.softmax((x * SCALE).masked_fill(~causal, float("-inf")), dim=-1)
    return softmax_eager


def fasttx_fn(c: dict):
    return lambda x: fasttx.softmax(x, scale=SCALE, is_causal=True)


def bytes_moved(c: dict, mode: str) -> int:
    numel = 1
    for s in c["shape"]:
        numel *= s
    return (2 if mode == "fwd" else 5) * numel * torch.empty((), dtype=dtype_of(c["dtype"])).element_size()


SPEC = OpSpec(
    name="softmax",
    params=("shape", "dtype"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    bytes_moved=bytes_moved,
    formula="minimal bytes: fwd = 2*numel*elem (read x, write y); fwd+bwd = 5*numel*elem "
            "(+ read grad_y and y, write grad_x)",
    is_key_case=lambda c: tuple(c["shape"]) == KEY_SHAPE,
)
