"""How fast can any gelu_ffn forward+backward be on this CPU? Its six GEMMs, timed alone.

    python -m bench.gelu_ffn_bound [--tokens 8192 --d-model 768 --d-hidden 3072 --threads 2 --rounds 5]

The fused FFN cannot skip a GEMM: forward x w1^T and act w2^T, backward
grad_out w2, grad_out^T act, grad_h^T x and grad_h w1 (6 x 2 M d h FLOPs).
Each is timed here on its own, into a preallocated output, in whichever
orientation (C or C^T = B^T A^T) MKL runs faster, so their sum is a lower
bound on any implementation's time, before a single elementwise pass.
Eager fc2(gelu(fc1(x))) forward+backward and fasttx.gelu_ffn are timed in
the same rounds, interleaved, as bench's harness does (.grad set to None,
outputs freed after the clock stops). The bound on the speedup is then
eager / (sum of the GEMMs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fasttx
from bench import allocator
from fasttx.ops.gelu_ffn import gelu_ffn_ref


def _seconds(fn) -> float:
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def gemm_cases(m: int, d: int, h: int) -> dict:
    """The six GEMMs as (A, B, shape of A @ B), on random operands of the right layouts."""
    x, w1, w2 = torch.randn(m, d), torch.randn(h, d), torch.randn(d, h)
    act, grad_out = torch.randn(m, h), torch.randn(m, d)
    return {
        "preact = x w1^T": (x, w1.t(), (m, h)),
        "out = act w2^T": (act, w2.t(), (m, d)),
        "grad_act = grad_out w2": (grad_out, w2, (m, h)),
        "grad_w2 = grad_out^T act": (grad_out.t(), act, (d, h)),
        "grad_w1 = grad_h^T x": (act.t(), x, (h, d)),
        "grad_x = grad_h w1": (act, w1, (m, d)),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gelu_ffn_bound", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-hidden", type=int, default=3072)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    m, d, h = args.tokens, args.d_model, args.d_hidden

    params = [torch.randn(m, d), torch.randn(h, d) * d ** -0.5, torch.randn(h), torch.randn(d, h) * h ** -0.5,
              torch.randn(d)]
    params = [p.requires_grad_() for p in params]
    grad = torch.randn(m, d)

    def fwd_bwd(fn):
        def call():
            for p in params:
                p.grad = None
            start = time.perf_counter()
            y = fn(*params, "gelu")
            y.backward(grad)
            elapsed = time.perf_counter() - start
            del y
            return elapsed
        return call

    providers = {"eager": fwd_bwd(gelu_ffn_ref), "fasttx": fwd_bwd(fasttx.gelu_ffn)}
    times = {name: [] for name in providers}
    # Providers first, then the GEMMs, each phase in its own rounds: timed within the same rounds,
    # the GEMMs' seconds between two eager calls changed eager's page-fault cost (1.1 s against
    # 0.7 s on a VM whose freed pages go back to the host), and the harness does not do that.
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, call in providers.items():
            times[name].append(call())
    cases = gemm_cases(m, d, h)
    outputs = {name: (torch.empty(shape), torch.empty(shape[::-1])) for name, (_, _, shape) in cases.items()}
    gemm_times = {name: {"C": [], "C^T": []} for name in cases}
    for _ in range(args.rounds + 1):
        for name, (a, b, _) in cases.items():
            c, ct = outputs[name]
            gemm_times[name]["C"].append(_seconds(lambda: torch.mm(a, b, out=c)))
            gemm_times[name]["C^T"].append(_seconds(lambda: torch.mm(b.t(), a.t(), out=ct)))

    flop = 2 * m * d * h
    print(f"gelu_ffn {m} x {d} -> {h}, fp32, {args.threads} threads, {allocator.current()} malloc, "
          f"medians of {args.rounds} rounds")
    total = 0.0
    for name, t in gemm_times.items():
        best = min(statistics.median(t["C"][1:]), statistics.median(t["C^T"][1:]))
        total += best
        print(f"  {name:26s} {best * 1e3:7.1f} ms  {flop / best / 1e9:5.0f} GFLOP/s")
    eager, fused = (statistics.median(times[k][1:]) for k in ("eager", "fasttx"))
    ratios = [e / f for e, f in zip(times["eager"][1:], times["fasttx"][1:])]
    print(f"  six GEMMs alone            {total * 1e3:7.1f} ms")
    print(f"eager fwd+bwd {eager * 1e3:.1f} ms, fasttx {fused * 1e3:.1f} ms: "
          f"fasttx {statistics.median(ratios):.2f}x eager")
    print(f"bound: eager / six GEMMs = {eager / total:.2f}x, with every elementwise pass free")
    return {"gemms_s": total, "eager_s": eager, "fasttx_s": fused, "bound": eager / total}


if __name__ == "__main__":
    main()
