"""One timing sample of a callable, the way each device needs it, and the statistics we report."""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

QUANTILES = (0.2, 0.5, 0.8)


def sample(device: torch.device, fn: Callable, reset: Optional[Callable] = None) -> float:
    """Seconds for one call of ``fn`` (``reset`` runs first, untimed on the CPU)."""
    if device.type == "cuda":
        return _sample_cuda(fn, reset)
    if reset is not None:
        reset()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out  # freed after the clock stops: munmap of a large block is not the op's cost
    return elapsed


def _sample_cuda(fn, reset):
    # One sample = do_bench's median over a short burst: it syncs, flushes L2 and uses events.
    def call():
        if reset is not None:
            reset()
        fn()
    try:
        from triton.testing import do_bench
    except ImportError:
        return _sample_cuda_events(call)
    return do_bench(call, warmup=5, rep=25, return_mode="median") / 1e3


def _sample_cuda_events(call):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def synchronize(device: torch.device):
    """Wait for queued GPU work, so a host clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(values) -> dict:
    """median, q20 and q80 of ``values``."""
    q20, med, q80 = np.quantile(np.asarray(values, dtype=float), QUANTILES)
    return {"median": float(med), "q20": float(q20), "q80": float(q80)}
