"""What an op's benchmark file declares; the harness (bench/harness.py) does the rest.

Adding an op = one file in bench/ops/ that builds an OpSpec and registers it
in bench/ops/__init__.py. Case parameters are plain JSON values (tuples for
shapes, dtype names as strings) so they can go to a child process and into
the results files unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

MODES = ("fwd", "fwd+bwd")
LEVELS = ("full", "quick", "smoke")


@dataclass(frozen=True)
class OpSpec:
    name: str
    # names of the case parameters, in table order (the keys of every case dict)
    params: tuple
    # level ("full", "quick" or "smoke") -> list of cases, each a dict of parameters
    sweep: Callable[[str], list]
    # (case, device) -> fresh input tensors, none requiring grad yet
    make_inputs: Callable[[dict, torch.device], tuple]
    # case -> fn(*inputs): what a user writes in plain PyTorch ("eager", and what "compile" compiles)
    eager: Callable[[dict], Callable]
    # case -> fn(*inputs) calling the public fasttx API (the backend is forced around it)
    fasttx: Callable[[dict], Callable]
    # (case, mode) -> minimal bytes moved: makes the op memory-bound, reported in GB/s vs copy bandwidth
    bytes_moved: Optional[Callable[[dict, str], int]] = None
    # (case, mode) -> FLOPs: makes the op compute-bound, reported in GFLOP/s vs GEMM
    flops: Optional[Callable[[dict, str], int]] = None
    # the formulas above in words; copied into the JSON and printed with the tables
    formula: str = ""
    modes: tuple = MODES
    # which inputs require grad in fwd+bwd (indices into make_inputs' tuple)
    grad_inputs: tuple = (0,)
    # inputs every provider keeps for backward alike (weights): left out of "saved for bwd"
    saved_excludes: tuple = ()
    # one markdown table per mode and per value of these parameters
    table_by: tuple = ("dtype",)
    # the cases an issue or a reviewer asks about first; repeated in the summary
    is_key_case: Callable[[dict], bool] = lambda case: False
    # more PyTorch providers for this op: (name, case -> fn(*inputs)), e.g. a fused torch kernel
    torch_providers: tuple = ()
    # one of those names: every row also gets its paired speedup over it ("vs_<name>")
    compare_to: Optional[str] = None
    # (case, threads, allocator) -> why this run leaves the case out (None: run it); said in the tables
    leave_out: Callable[[dict, int, str], Optional[str]] = lambda case, threads, allocator: None


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def format_param(value) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def case_label(case: dict) -> str:
    return " ".join(format_param(v) for v in case.values())


def normalize_case(case: dict) -> dict:
    """JSON turns tuples into lists; turn them back so cases compare and print the same."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in case.items()}
