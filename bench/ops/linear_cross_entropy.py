"""linear_cross_entropy: an LM head's loss, F.cross_entropy(hidden @ weight.T, target), never holding the logits.

Compute-bound: reported in GFLOP/s against the machine's GEMM in the same run.

    fwd      the logits GEMM                               = 1 * 2*N*d*V FLOPs
    fwd+bwd  + grad_hidden = dlogits W, grad_W = dlogits^T h = 3 * 2*N*d*V FLOPs

(fasttx's fwd+bwd computes its gradients in the forward pass: its "fwd" time in fwd+bwd mode is
the whole step, its backward a scaling.) The row work (softmax, loss, gradient) is left out of the
count. The bound the issue holds it to is the provider ``three_gemms``: the same three GEMMs per
chunk of tokens, into the same preallocated chunk buffer, with no row kernel, timed in the same
rounds; ``vs three_gemms`` is its time over fasttx's (>= 1/1.15 = 0.87 is the target).

Memory: the harness's peak_memory is CUDA's; on the CPU, ``python -m bench.lce_memory`` measures
the peak of live allocated bytes of one step (torch's profiler records every CPU allocation).
Eager at V = 128256 in fp32 holds ~3 x 4.2 GB: run those cases on a quiet machine only.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

import fasttx
from bench.spec import OpSpec, dtype_of

_lce = importlib.import_module("fasttx.ops.linear_cross_entropy")

KEY_CASES = [{"tokens": 8192, "d": 2048, "vocab": v, "dtype": dt} for dt in ("float32", "bfloat16")
             for v in (32000, 128256)]
SMOKE = {"tokens": 64, "d": 32, "vocab": 1000, "dtype": "float32"}


def sweep(level: str) -> list:
    """V 32000 in fp32 and bf16. V 128256 (the issue's second vocabulary) is left out of the sweeps: its
    eager fwd+bwd takes about 100 s a call in fp32 on 2 cores, which made `make bench` run for hours. Run it
    on its own: bench.suite.run(ops=["linear_cross_entropy"], cases={"linear_cross_entropy": [KEY_CASES[i]
    for i in (1, 3)]}) (docs/benchmarks.md, 2026-12-07, has its figures)."""
    if level == "smoke":
        return [dict(SMOKE)]
    return [dict(c) for c in KEY_CASES if c["vocab"] == 32000]


def leave_out(c: dict, threads: int, allocator: str):
    """The 8192 x 2048 x V cases are compute-bound and take 9-20 s a provider a round: they run once, where
    issue 25 measures them (2 threads, glibc), not again at 1 thread and under tcmalloc (another ~40 minutes
    of `make bench` on 2 cores)."""
    if c["tokens"] * c["d"] * c["vocab"] < 8192 * 2048 * 32000:
        return None
    if threads < 2:
        return "the 8192-token cases run at 2 threads only, to keep make bench near an hour"
    if allocator != "glibc":
        return "the 8192-token cases run under glibc only: compute-bound, the allocator does not move them"
    return None


def make_inputs(c: dict, device: torch.device) -> tuple:
    dtype, n, d, v = dtype_of(c["dtype"]), c["tokens"], c["d"], c["vocab"]
    hidden = torch.randn(n, d, device=device).to(dtype)
    weight = (torch.randn(v, d, device=device) * d ** -0.5).to(dtype)
    return hidden, weight, torch.randint(0, v, (n,), device=device)


def eager(c: dict):
    def linear_cross_entropy_eager(hidden, weight, target):  # what an LM's forward writes
        return F.cross_entropy(hidden @ weight.t(), target)
    return linear_cross_entropy_eager


def fasttx_fn(c: dict):
    return lambda hidden, weight, target: fasttx.linear_cross_entropy(hidden, weight, target)


class _ThreeGemms(torch.autograd.Function):
    """fasttx's chunk loop without its row kernel: per chunk, logits = h W^T into the chunk buffer, then
    (when a gradient is wanted) grad_h = logits W and grad_W += logits^T h (the first chunk writes it).
    The GEMMs run where the op's do (fasttx's CPU GEMM for fp32 on the CPU, torch.mm elsewhere; fp32
    accumulation for bf16 over several chunks)."""

    @staticmethod
    def forward(ctx, hidden, weight):
        backend = "cpu" if hidden.is_cpu and fasttx.backends.extension() is not None else "torch"
        gemm = _lce._Gemms(backend, hidden)
        n, v = hidden.shape[0], weight.shape[0]
        logits_dtype = gemm.logits_dtype(hidden.dtype)
        rows = _lce.chunk_rows(n, v, logits_dtype.itemsize)
        buffer = hidden.new_empty(min(rows, n), v, dtype=logits_dtype)
        need = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if need else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if not _lce._FP32_WEIGHT_GRAD or rows >= n:  # one chunk: grad_W in the weight's dtype, as the op
            acc = hidden.dtype
        grad_w = weight.new_empty(weight.shape, dtype=acc) if need else None
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            h, logits = hidden[start:stop], buffer[:stop - start]
            gemm.mm(logits, h, weight.t())
            if need:
                dlogits = logits if logits.dtype == hidden.dtype else logits.to(hidden.dtype)
                gemm.mm(grad_h[start:stop], dlogits, weight)
                gemm.accumulate(grad_w, dlogits.t(), h, overwrite=start == 0)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need else None)
        return hidden.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, grad_w * grad


def three_gemms(c: dict):
    return lambda hidden, weight, target: _ThreeGemms.apply(hidden, weight)


def flops(c: dict, mode: str) -> int:
    gemm = 2 * c["tokens"] * c["d"] * c["vocab"]
    return (1 if mode == "fwd" else 3) * gemm


SPEC = OpSpec(
    name="linear_cross_entropy",
    params=("tokens", "d", "vocab", "dtype"),
    sweep=sweep,
    leave_out=leave_out,
    make_inputs=make_inputs,
    eager=eager,
    fasttx=fasttx_fn,
    flops=flops,
    formula="GEMM FLOPs: fwd = 2*N*d*V (the logits); fwd+bwd = 3 x 2*N*d*V (+ grad_hidden, grad_weight); "
            "row work not counted. Bound: three_gemms, the same chunked GEMMs without the row kernel",
    grad_inputs=(0, 1),
    saved_excludes=(0, 1),
    table_by=("dtype",),
    is_key_case=lambda c: {k: c[k] for k in ("tokens", "d", "vocab", "dtype")} in KEY_CASES,
    torch_providers=(("three_gemms", three_gemms),),
    compare_to="three_gemms",
)
