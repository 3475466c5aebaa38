"""Input checks shared by the ops: errors name the argument, what came and what was expected."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

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


def _is_symbolic(value) -> bool:
    # torch.compile may pass scalars as SymInt/SymFloat/SymBool: their type is right, their value unknown
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def check_int(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"fasttx.{op}: {name} must be an int, got {type(value).__name__} {value!r}")


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, (bool, torch.SymBool)):
        raise TypeError(f"fasttx.{op}: {name} must be a bool, got {type(value).__name__} {value!r}")


def check_real(op: str, name: str, value, low=None, high=None, none_ok=False) -> None:
    """A finite int or float in [low, high] (either bound may be None), or None where none_ok."""
    # value - value == 0: finite, written as a comparison because torch.compile traces a float that differs
    # between compiled calls (two models' norm eps) as a SymFloat whose type reads float: a comparison of it is
    # a guard, math.isfinite of it a graph break
    if type(value) is float and value - value == 0 and (low is None or value >= low) \
            and (high is None or value <= high):
        return  # the common case first: a norm's whole Python path is a few microseconds
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        wanted = "a float or None" if none_ok else "a float"
        raise TypeError(f"fasttx.{op}: {name} must be {wanted}, got {type(value).__name__} {value!r}")
    if _is_symbolic(value):
        return
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = {(True, True): f" in [{low}, {high}]", (True, False): f" >= {low}", (False, True): f" <= {high}",
                  (False, False): ""}[(low is not None, high is not None)]
        raise ValueError(f"fasttx.{op}: {name} must be a finite number{bounds}, got {value!r}")


def check_shape(op: str, name: str, value) -> tuple:
    """An int or a sequence of ints (a torch.Size, list or tuple) of sizes >= 0, as a tuple."""
    if type(value) is int and value >= 0:
        return (value,)
    if type(value) in (tuple, torch.Size) and all(type(d) is int and d >= 0 for d in value):
        return tuple(value)
    dims = (value,) if isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool) else value
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(dims, Sequence) or \
            any(isinstance(d, bool) or not isinstance(d, (numbers.Integral, torch.SymInt)) for d in dims):
        raise TypeError(f"fasttx.{op}: {name} must be an int or a sequence of ints, got "
                        f"{type(value).__name__} {value!r}")
    if any(not _is_symbolic(d) and d < 0 for d in dims):
        raise ValueError(f"fasttx.{op}: {name} must hold sizes >= 0, got {tuple(dims)}")
    return tuple(d if _is_symbolic(d) else int(d) for d in dims)
