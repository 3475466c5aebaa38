"""The generic harness: providers, interleaved timing, statistics, one row per provider and case.

Nothing here knows about a particular op; bench/ops/<op>.py says what to run.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

import fasttx
from fasttx import backends

from bench import allocator, roofline, timing
from bench.spec import OpSpec, case_label


@dataclass(frozen=True)
class Settings:
    warmup: int          # untimed calls per provider after the first one (>= 1: the first is checked)
    min_reps: int        # rounds of timing per case, at least ...
    max_reps: int        # ... and at most
    budget_s: float      # wanted seconds of timed rounds per case; reps = budget / one round, clamped
    roofline_reps: int
    copy_bytes: int      # 0 = max(64 MiB, 4 x last-level cache)
    gemm_n: int


SETTINGS = {
    "full": Settings(warmup=1, min_reps=5, max_reps=30, budget_s=1.0, roofline_reps=10, copy_bytes=0, gemm_n=2048),
    "quick": Settings(warmup=1, min_reps=5, max_reps=15, budget_s=0.5, roofline_reps=6, copy_bytes=0, gemm_n=2048),
    # smoke: proves the harness works end to end, the numbers mean nothing
    "smoke": Settings(warmup=1, min_reps=3, max_reps=3, budget_s=0.0, roofline_reps=3, copy_bytes=8 << 20, gemm_n=256),
}


# ---- providers -------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[OpSpec, dict], Callable]  # (spec, case) -> fn(*inputs)


def _fasttx_provider(backend: str) -> Provider:
    def make(spec, case):
        fn = spec.fasttx(case)

        def forced(*inputs):
            # the backend is chosen at forward time and carried to backward by the op itself
            with fasttx.use_backend(backend):
                return fn(*inputs)
        return forced
    return Provider(f"fasttx-{backend}", make)


EAGER = Provider("eager", lambda spec, case: spec.eager(case))
# dynamic=False: one static graph per shape, as a user benchmarking a fixed shape gets
COMPILE = Provider("compile", lambda spec, case: torch.compile(spec.eager(case), dynamic=False))


def providers_for(device: torch.device) -> tuple:
    """(providers that can run on ``device``, {name: why not} for the others)."""
    machine = backends.machine_reasons()
    available, missing = [], {}
    for backend in fasttx.BACKENDS:
        why = machine[backend] or backends.device_reason(backend, device)
        if backend == "triton" and device.type == "cpu":
            why = "Triton on the CPU is the interpreter, for tests only"
        if why:
            missing[f"fasttx-{backend}"] = why
        else:
            available.append(_fasttx_provider(backend))
    return available + [EAGER, COMPILE], missing


def own_providers(spec: OpSpec) -> list:
    """The PyTorch providers one op adds (spec.torch_providers), e.g. attention's SDPA."""
    return [Provider(name, lambda spec, case, make=make: make(case)) for name, make in spec.torch_providers]


# ---- one case ----------------------------------------------------------------------

@dataclass
class Runner:
    """A provider bound to one case's inputs: what one timed call does."""
    name: str
    fn: Callable
    inputs: tuple
    grad: Optional[torch.Tensor]  # None in fwd mode

    def reset(self):
        # None, not zero: no memset and a fresh .grad, like optimizer.zero_grad(set_to_none=True)
        for t in self.inputs:
            if t.requires_grad:
                t.grad = None

    def step(self):
        y = self.fn(*self.inputs)
        if self.grad is not None:
            torch.autograd.backward(y, self.grad)
        return y  # the caller drops it after the clock stops


def _outputs(f: Callable, y):
    """f applied to an op's output, or to each of a tuple of outputs (apply_rotary's q and k)."""
    return tuple(f(t) for t in y) if isinstance(y, tuple) else f(y)


def max_abs_err(y, reference) -> float:
    """The largest |y - reference| over the output, or over all of a tuple of outputs."""
    pairs = zip(y, reference) if isinstance(y, tuple) else ((y, reference),)
    return max(((a.detach().float() - b.float()).abs().max().item() for a, b in pairs if a.numel()), default=0.0)


def saved_for_backward(fn: Callable, inputs: tuple, exclude: tuple = ()):
    """(output, bytes of the distinct storages autograd saves during one forward of ``fn``,
    less those of the tensors in ``exclude``)."""
    storages = {}
    left_out = {(t.untyped_storage().device, t.untyped_storage().data_ptr()) for t in exclude}

    def pack(t):
        s = t.untyped_storage()
        if (s.device, s.data_ptr()) not in left_out:
            storages[(s.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*inputs)
    return y, sum(storages.values())


def peak_memory(runner: Runner, device: torch.device) -> Optional[int]:
    """Bytes allocated above the inputs at the peak of one call; None where the device cannot tell (CPU)."""
    if device.type != "cuda":
        return None
    runner.reset()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    y = runner.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del y
    return peak


def _prepare(provider, spec, case, inputs, grad, reference, device, settings):
    """Build, warm up and check one provider; raises when it cannot run this case.

    Returns (runner, seconds of one warm call, info). Every call here is untimed:
    the first compiles (compile) or loads kernels, the second is a whole step
    run under the saved-tensor hooks and checked against eager, the rest warm up.
    """
    runner = Runner(provider.name, provider.make(spec, case), inputs, grad)
    start = time.perf_counter()
    runner.reset()
    runner.step()
    timing.synchronize(device)
    first_call_s = time.perf_counter() - start

    # not under no_grad: torch.compile would recompile for another grad mode
    runner.reset()
    start = time.perf_counter()
    y, saved = saved_for_backward(runner.fn, inputs, tuple(inputs[i] for i in spec.saved_excludes))
    if grad is not None:
        torch.autograd.backward(y, grad)
    timing.synchronize(device)
    warm = [time.perf_counter() - start]
    err = max_abs_err(y, reference)
    del y
    warm += [timing.sample(device, runner.step, runner.reset) for _ in range(settings.warmup - 1)]
    info = {"first_call_s": first_call_s, "saved_bytes": saved, "max_abs_err": err,
            "peak_mem_bytes": peak_memory(runner, device)}
    return runner, min(warm), info


def _interleaved(runners: list, reps: int, device: torch.device) -> dict:
    """Per provider, one time per round; every round runs each provider once, in a rotated order."""
    times = {r.name: [] for r in runners}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of one provider's call would bill it alone
    try:
        for i in range(reps):
            k = i % len(runners)
            for r in runners[k:] + runners[:k]:
                times[r.name].append(timing.sample(device, r.step, r.reset))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _reps(settings: Settings, round_s: float) -> int:
    wanted = math.ceil(settings.budget_s / round_s) if round_s > 0 else settings.max_reps
    return max(settings.min_reps, min(settings.max_reps, wanted))


def run_case(spec: OpSpec, case: dict, mode: str, providers: list, device: torch.device,
             settings: Settings, run_info: dict, roof: dict) -> list:
    """Time every provider on one case and mode; one row per provider."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # compile afresh per case: no recompile limit, and the thread count is baked in
    inputs = spec.make_inputs(case, device)
    if mode == "fwd+bwd":
        for i in spec.grad_inputs:
            inputs[i].requires_grad_(True)
    with torch.no_grad():
        reference = spec.eager(case)(*inputs)
    grad = _outputs(torch.randn_like, reference) if mode == "fwd+bwd" else None

    rows, runners, round_s = {}, [], 0.0
    for p in providers:
        row = {"op": spec.name, **run_info, **case, "mode": mode, "provider": p.name}
        try:
            runner, warm_s, info = _prepare(p, spec, case, inputs, grad, reference, device, settings)
        except Exception as e:  # e.g. a backend without bfloat16: a row that says why, not a crash
            first_line = (str(e).splitlines() or [""])[0]
            rows[p.name] = {**row, "status": "skipped", "reason": f"{type(e).__name__}: {first_line}"}
            continue
        rows[p.name] = {**row, "status": "ok", **info}
        runners.append(runner)
        round_s += warm_s

    reps = _reps(settings, round_s)
    times = _interleaved(runners, reps, device) if runners else {}
    eager_times = times.get(EAGER.name)
    for name, t in times.items():
        rows[name].update(_figures(spec, case, mode, t, eager_times, roof))
        if spec.compare_to and times.get(spec.compare_to):
            ratio = timing.quantiles([b / x for b, x in zip(times[spec.compare_to], t)])
            rows[name].update({f"vs_{spec.compare_to}": ratio["median"], f"vs_{spec.compare_to}_q20": ratio["q20"],
                               f"vs_{spec.compare_to}_q80": ratio["q80"]})
    return list(rows.values())


def _figures(spec, case, mode, times, eager_times, roof) -> dict:
    """Statistics and throughput of one provider's times (seconds, one per round)."""
    ms = timing.quantiles([t * 1e3 for t in times])
    out = {"reps": len(times), "median_ms": ms["median"], "q20_ms": ms["q20"], "q80_ms": ms["q80"],
           "times_ms": [t * 1e3 for t in times]}
    seconds = ms["median"] / 1e3
    if spec.bytes_moved:
        out["bytes"] = spec.bytes_moved(case, mode)
        out["gbps"] = out["bytes"] / seconds / 1e9
        out["pct_copy_bw"] = 100 * out["gbps"] / roof["copy"]["gbps"]
    if spec.flops:
        out["flops"] = spec.flops(case, mode)
        out["gflops"] = out["flops"] / seconds / 1e9
        out["pct_gemm"] = 100 * out["gflops"] / roof["gemm"]["gflops"]
    if eager_times:
        # paired per round: both ran within the same round, so slow drift cancels
        ratio = timing.quantiles([e / t for e, t in zip(eager_times, times)])
        out.update(speedup=ratio["median"], speedup_q20=ratio["q20"], speedup_q80=ratio["q80"])
    return out


# ---- a whole suite under the allocator of this process -----------------------------

def run_suite(specs: list, cases: dict, threads_list: list, device: torch.device, settings: Settings,
              provider_names: Optional[list] = None, on_run: Optional[Callable[[str, dict], None]] = None) -> dict:
    """{op: [run, ...]}, one run per thread count, each {allocator, threads, roofline, rows, ...}.
    on_run(op, run) is called as each run ends (the suite writes what it has so far)."""
    providers, missing = providers_for(device)
    if provider_names:
        providers = [p for p in providers if p.name in provider_names]
    alloc = allocator.current()
    results = {spec.name: [] for spec in specs}
    for threads in threads_list:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        tag = f"[{alloc}, {threads} thread(s)]"
        tqdm.write(f"{tag} measuring the roofline (copy bandwidth, GEMM) ...")
        roof = roofline.measure(device, settings.copy_bytes, settings.gemm_n, settings.roofline_reps)
        tqdm.write(f"{tag} copy {roof['copy']['gbps']:.1f} GB/s, GEMM fp32 {roof['gemm']['gflops']:.1f} GFLOP/s; "
                   f"providers: {', '.join(p.name for p in providers)}")
        for spec in specs:
            mine = providers + [p for p in own_providers(spec) if not provider_names or p.name in provider_names]
            run = {**_run_op(spec, cases[spec.name], mine, device, settings, alloc, threads, roof),
                   "unavailable_providers": missing}
            results[spec.name].append(run)
            if on_run is not None:
                on_run(spec.name, run)
    return results


def _run_op(spec, cases, providers, device, settings, alloc, threads, roof) -> dict:
    """Every case and mode of one op, with a progress bar."""
    load_before, started = os.getloadavg()[0], time.perf_counter()
    run_info = {"allocator": alloc, "threads": threads}
    rows, left_out = [], {}
    for c in cases:
        why = spec.leave_out(c, threads, alloc)
        if why:
            left_out[case_label(c)] = why
    todo = [(c, m) for c in cases if case_label(c) not in left_out for m in spec.modes]
    bar = tqdm(todo, desc=f"{spec.name} [{alloc}, {threads}t]", unit="case", dynamic_ncols=True)
    for case, mode in bar:
        bar.set_postfix_str(f"{case_label(case)} {mode}")
        rows += run_case(spec, case, mode, providers, device, settings, run_info, roof)
    run = {**run_info, "roofline": roof, "rows": rows, "elapsed_s": round(time.perf_counter() - started, 1),
           "loadavg_1min": [load_before, os.getloadavg()[0]], "cases_left_out": left_out}
    warning = _busy_warning(run["loadavg_1min"])
    if warning:
        run["busy_warning"] = warning
        tqdm.write(warning)
    return run


def _busy_warning(loadavg) -> Optional[str]:
    """Other processes on the cores make every number noisy; say so next to the numbers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # more runnable tasks than cores: someone else's work took turns with ours
    if max(loadavg) <= cores + 0.5:
        return None
    return (f"warning: the machine was busy (1-min load average {loadavg[0]:.1f} before, {loadavg[1]:.1f} after, "
            f"on {cores} cores): other processes competed for the CPU, treat these numbers as noisy")


def default_threads(device: torch.device) -> list:
    if device.type != "cpu":
        return [torch.get_num_threads()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return sorted({1, cores})
