"""layer_norm, add_layer_norm, rms_norm and add_rms_norm over rows of (M, N): one kernel family, four specs.

Memory-bound. Minimal traffic of an ideal fused kernel, weight and bias (N
elements) left out:

    layer_norm, rms_norm  fwd      read x, write y                               = 2 * M*N * elem
                          fwd+bwd  + read grad_y and x, write grad_x             = 5 * M*N * elem
    add_layer_norm,       fwd      read x and r, write s = x + r and y           = 4 * M*N * elem
    add_rms_norm          fwd+bwd  + read grad_y and s, write grad_x (= grad_r)  = 7 * M*N * elem

add_layer_norm and add_rms_norm are timed as a block uses their y: the backward
starts from grad_y only (the harness takes one output), in fasttx and eager
alike. Eager is `x + r` then F.layer_norm / F.rms_norm, which writes s and reads
it back. add_rms_norm runs one shape (4096 tokens of LLaMA-7B's width) in its
full and quick sweeps: its kernel is add_layer_norm's with RMS on, and all three
shapes would add rms_norm's two minutes to `make bench` for little news.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fasttx
from bench.spec import OpSpec, dtype_of

FULL_SHAPES = ((4096, 768), (4096, 4096), (16384, 1024))
SMOKE_SHAPES = ((64, 128),)


def sweep(level: str, shapes=FULL_SHAPES) -> list:
    if level == "smoke":
        return [{"shape": SMOKE_SHAPES[0], "dtype": "float32"}]
    dtypes = ("float32", "bfloat16") if level == "full" else ("float32",)
    return [{"shape": s, "dtype": d} for d in dtypes for s in shapes]


def _elem(case):
    return torch.empty((), dtype=dtype_of(case["dtype"])).element_size()


def _inputs(n_rows_like: int, with_bias: bool):
    def make(case: dict, device: torch.device) -> tuple:
        m, n = case["shape"]
        dtype = dtype_of(case["dtype"])
        rows = [torch.randn(m, n, dtype=dtype, device=device) for _ in range(n_rows_like)]
        params = [1 + 0.1 * torch.randn(n, dtype=dtype, device=device)]
        if with_bias:
            params.append(0.1 * torch.randn(n, dtype=dtype, device=device))
        return tuple(rows + params)
    return make


def _spec(name, rows_in, with_bias, eager, fused, fwd_elems, total_elems, formula, shapes=FULL_SHAPES):
    n_inputs = rows_in + 1 + int(with_bias)
    return OpSpec(
        name=name,
        params=("shape", "dtype"),
        sweep=lambda level: sweep(level, shapes),
        make_inputs=_inputs(rows_in, with_bias),
        eager=lambda case: eager,
        fasttx=lambda case: fused,
        bytes_moved=lambda case, mode: (fwd_elems if mode == "fwd" else total_elems)
        * case["shape"][0] * case["shape"][1] * _elem(case),
        formula=formula,
        grad_inputs=tuple(range(n_inputs)),
        table_by=("dtype",),
        is_key_case=lambda c: c["dtype"] == "float32",
    )


def _n(x):
    return x.shape[-1:]


LAYER_NORM = _spec(
    "layer_norm", 1, True,
    lambda x, w, b: F.layer_norm(x, _n(x), w, b),
    lambda x, w, b: fasttx.layer_norm(x, _n(x), w, b),
    2, 5, "minimal bytes: fwd = 2*M*N*elem (read x, write y); fwd+bwd = 5*M*N*elem")
ADD_LAYER_NORM = _spec(
    "add_layer_norm", 2, True,
    lambda x, r, w, b: F.layer_norm(x + r, _n(x), w, b),
    lambda x, r, w, b: fasttx.add_layer_norm(x, r, _n(x), w, b)[0],
    4, 7, "minimal bytes: fwd = 4*M*N*elem (read x, r; write s, y); fwd+bwd = 7*M*N*elem "
          "(+ read grad_y, s; write grad_x); backward from grad_y only")
RMS_NORM = _spec(
    "rms_norm", 1, False,
    lambda x, w: F.rms_norm(x, _n(x), w),
    lambda x, w: fasttx.rms_norm(x, _n(x), w),
    2, 5, "minimal bytes: fwd = 2*M*N*elem (read x, write y); fwd+bwd = 5*M*N*elem")
ADD_RMS_NORM = _spec(
    "add_rms_norm", 2, False,
    lambda x, r, w: F.rms_norm(x + r, _n(x), w),
    lambda x, r, w: fasttx.add_rms_norm(x, r, _n(x), w)[0],
    4, 7, "minimal bytes: fwd = 4*M*N*elem (read x, r; write s, y); fwd+bwd = 7*M*N*elem "
          "(+ read grad_y, s; write grad_x); backward from grad_y only",
    shapes=((4096, 4096),))
