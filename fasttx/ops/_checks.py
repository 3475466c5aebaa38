"""Input checks shared by the ops: errors name the argument, what came and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fasttx.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fasttx.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"fasttx.{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"fasttx.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"fasttx.{op}: {name} must be one of {tuple(choices)}, got {value!r}")
