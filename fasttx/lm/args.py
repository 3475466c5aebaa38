"""argparse types for the LM commands: a bad number is refused by argparse, with the flag and the rule.

``--lr inf`` or ``--threads -1`` would otherwise reach the trainer and fail late (a traceback, a NaN run).
"""
from __future__ import annotations

import argparse
import math

import torch


def integer(low: int = 0, high: int | None = None):
    """An int in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            rule = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def real(low: float = 0.0, *, above: bool = False, below: float | None = None):
    """A finite float >= low (> low with above=True), and < below when given."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if value < low or (above and value == low) or (below is not None and value >= below):
            rule = f"{'>' if above else '>='} {low:g}" + (f" and < {below:g}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = "finite number"
    return parse


def check_device(name: str | None) -> None:
    """ValueError when a CUDA device is asked for and none is usable (torch would fail later, in a traceback)."""
    if name is None:
        return
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows (expected cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (torch.cuda.is_available() is False); "
                         f"use --device cpu")


SEED = integer(0, 2**63 - 1)  # torch.manual_seed takes 64 bits
