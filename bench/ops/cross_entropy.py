"""cross_entropy: an LM's loss over (tokens, vocab) logits, mean over int64 targets.

Memory-bound, reported in GB/s against the minimal traffic (targets ignored):

    fwd      reads the logits once                                 = 1 * N*V * elem bytes
    fwd+bwd  fwd, then reads the logits again, writes grad_logits  = 3 * N*V * elem bytes

Eager F.cross_entropy writes log_softmax's (N, V) output and reads it back, and its backward
writes another (N, V) tensor before the gradient; bf16 logits are upcast as PyTorch does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fasttx
from bench.spec import OpSpec, dtype_of

FULL_SHAPES = ((4096, 32000), (8192, 50257), (2048, 128256))
SMOKE_SHAPE = (64, 1000)
KEY_SHAPE = (4096, 32000)  # LLaMA-2's vocabulary, in every sweep but smoke


def case(shape, dtype="float32") -> dict:
    return {"shape": tuple(shape), "dtype": dtype}


def sweep(level: str) -> list:
    if level == "smoke":
        return [case(SMOKE_SHAPE)]
    shapes = FULL_SHAPES if level == "full" else (KEY_SHAPE,)
    return [case(s, d) for d in ("float32", "bfloat16") for s in shapes]


def make_inputs(c: dict, device: torch.device) -> tuple:
    n, v = c["shape"]
    return (torch.randn(n, v, dtype=dtype_of(c["dtype"]), device=device),
            torch.randint(0, v, (n,), device=device))


def eager(c: dict):
    def cross_entropy_eager(logits, target):
        return F.cross_entropy(logits.float(), target)
    return cross_entropy_eager


def fasttx_fn(c: dict):
    return lambda logits, target: fasttx.cross_entropy(logits, target)


def bytes_moved(c: dict, mode: str) -> int:
    n, v = c["shape"]
    return (1 if mode == "fwd" else 3) * n * v * torch.empty((), dtype=dtype_of(c["dtype"])).element_size()


SPEC = OpSpec(
    name="cross_entropy",
    params=("shape", "dtype"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    bytes_moved=bytes_moved,
    formula="minimal bytes: fwd = N*V*elem (read the logits); fwd+bwd = 3*N*V*elem "
            "(+ read them again, write grad_logits); targets ignored",
    grad_inputs=(0,),
    is_key_case=lambda c: tuple(c["shape"]) == KEY_SHAPE,
)
