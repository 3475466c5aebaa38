"""bias_gelu: y = gelu(x + bias), x of shape (M, N), bias of shape (N,).

Memory-bound, so it is reported in GB/s against the minimal traffic an ideal
fused kernel must move (bias is N elements against M*N, so it is left out):

    fwd      reads x, writes y                                = 2 * M*N * elem bytes
    fwd+bwd  fwd, then reads grad_y and x, writes grad_x      = 5 * M*N * elem bytes

Eager PyTorch moves more: x + bias is written, read back by GELU and saved
for backward, which is what the fused kernels avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fasttx
from bench.spec import OpSpec, dtype_of

FULL_SHAPES = ((4096, 768), (8192, 3072), (16384, 1024))
QUICK_SHAPES = ((4096, 768), (8192, 3072))
SMOKE_SHAPES = ((64, 128),)
KEY_SHAPE, KEY_DTYPE = (8192, 3072), "float32"  # the acceptance case, in every sweep but smoke
APPROXIMATIONS = ("none", "tanh")


def sweep(level: str) -> list:
    if level == "smoke":
        return [case(SMOKE_SHAPES[0], "float32", "none")]
    shapes, dtypes = (FULL_SHAPES, ("float32", "bfloat16")) if level == "full" else (QUICK_SHAPES, ("float32",))
    return [case(s, d, a) for d in dtypes for s in shapes for a in APPROXIMATIONS]


def case(shape, dtype: str = "float32", approximate: str = "none") -> dict:
    return {"shape": tuple(shape), "dtype": dtype, "approximate": approximate}


def make_inputs(case: dict, device: torch.device) -> tuple:
    m, n = case["shape"]
    dtype = dtype_of(case["dtype"])
    return (torch.randn(m, n, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device))


def eager(case: dict):
    approximate = case["approximate"]

    def bias_gelu_eager(x, bias):
        return F.gelu(x + bias, approximate=approximate)
    return bias_gelu_eager


def fasttx_fn(case: dict):
    approximate = case["approximate"]
    return lambda x, bias: fasttx.bias_gelu(x, bias, approximate=approximate)


def bytes_moved(case: dict, mode: str) -> int:
    m, n = case["shape"]
    elem = torch.empty((), dtype=dtype_of(case["dtype"])).element_size()
    return (2 if mode == "fwd" else 5) * m * n * elem


SPEC = OpSpec(
    name="bias_gelu",
    params=("shape", "dtype", "approximate"),
    sweep=sweep,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    bytes_moved=bytes_moved,
    formula="minimal bytes: fwd = 2*M*N*elem (read x, write y); fwd+bwd = 5*M*N*elem "
            "(+ read grad_y and x, write grad_x); bias ignored",
    grad_inputs=(0, 1),
    table_by=("dtype",),
    is_key_case=lambda c: tuple(c["shape"]) == KEY_SHAPE and c["dtype"] == KEY_DTYPE,
)
