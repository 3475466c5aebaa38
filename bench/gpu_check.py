"""`make gpu-check`: on the day a GPU is lent, build, test and time fasttx on it in one command.

    python -m bench.gpu_check --out DIR [--dry-run] [--test-budget S] [--bench-budget S]

For a machine that brings its own PyTorch and has no network (the lent H100/H200: Python 3.12,
torch 2.11, triton 3.6, nvcc 13, pytest, ninja, 16 cores). Nothing is installed and no venv is
made; the repository root is the import path. In order, each step writing to DIR:

1. info.txt: `python -m fasttx info` and nvidia-smi.
2. build.log: fasttx._C compiled just in time for this GPU's architecture only, with every core
   (MAX_JOBS), into a cache beside DIR; it fails the check if CUDA was not built.
3. gpu-tests.log, gpu-tests.json, gpu-tests.md: rung (e), `pytest -m gpu -v` with a per-test
   timeout (pytest-timeout, where installed) and a wall budget; counts by op and backend. Tests
   the budget cut off are reported as not run.
4. bench/<device>/<op>.{json,csv,png}, bench.md: every op at the README's shapes in float32 and
   bfloat16, fasttx's triton and cuda backends against eager, torch.compile and (attention)
   F.scaled_dot_product_attention (flash for bf16), each with TFLOP/s or GB/s and the percent of
   the device's datasheet peak. Ops are run in turn until the bench budget is spent.

Sized for 8 minutes on an H100: about 2 to build, --test-budget 240 s, --bench-budget 150 s.
Without a CUDA device (or with --dry-run) the same plumbing runs on the CPU and says so: the GPU
tests all skip, the benchmark runs tiny cases with two providers. CI runs that dry run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Dense datasheet peaks: (HBM bytes/s, TFLOP/s fp32 without tensor cores, TFLOP/s bf16 tensor cores).
DATASHEET = {"H100": (3.35e12, 67.0, 989.0), "H200": (4.8e12, 67.0, 989.0), "A100": (2.04e12, 19.5, 312.0)}

# The README's shapes, in float32 and bfloat16.
GPU_CASES = {
    "bias_gelu": [{"shape": (8192, 3072), "approximate": "tanh"}],
    "layer_norm": [{"shape": (16384, 1024)}],
    "add_layer_norm": [{"shape": (16384, 1024)}],
    "rms_norm": [{"shape": (16384, 1024)}],
    "add_rms_norm": [{"shape": (16384, 1024)}],
    "gelu_ffn": [{"tokens": 8192, "d_model": 768, "d_hidden": 3072, "activation": "gelu"}],
    "attention": [{"batch": 4, "heads": 12, "seq": 1024, "head_dim": 64, "causal": True}],
    "softmax": [{"shape": (4, 12, 1024, 1024)}],
    "cross_entropy": [{"shape": (4096, 32000)}],
    "apply_rotary": [{"shape": (4, 32, 8, 1024, 128)}],  # LLaMA-3-8B's q and k heads, 4 x 1024 tokens
    "glu_ffn": [{"tokens": 4096, "d_model": 2048, "d_hidden": 5632, "activation": "silu"}],
    "linear_cross_entropy": [{"tokens": 8192, "d": 2048, "vocab": 32000}],
}
DTYPES = ("float32", "bfloat16")
# The backend in a test id: "cuda-<backend>" (backend_params), else a bare backend parameter.
BACKEND_IN_ID = (re.compile(r"\bcuda-(triton|cuda|torch)\b"), re.compile(r"(?<=[\[-])(triton|cuda|torch)(?=[-\]])"))
# pytest -v's per-test line; ids may hold spaces, e.g. test_x[(1, 1)-cuda-triton].
RESULT_LINE = re.compile(r"^(tests/\S+?\.py)::(.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _say(text: str):
    print(f"== gpu-check: {text}", flush=True)


def _run_logged(cmd: list, log: Path, env: dict, budget: float | None = None) -> tuple[int | None, float]:
    """Run cmd from the repository root with its output in log (and on our stdout); (exit code or None
    if the budget cut it off, seconds)."""
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = None if budget is None else started + budget
        for line in proc.stdout:
            f.write(line)
            sys.stdout.write(line)
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                f.write(f"\n== gpu-check: stopped at the {budget:.0f} s budget ==\n")
                break
        rc = proc.wait()
    return (None if deadline is not None and time.perf_counter() > deadline else rc), time.perf_counter() - started


def _environment(out: Path, gpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", FASTTX_CACHE_DIR=str(out.parent / f"{out.name}-build-cache"))
    env.pop("FASTTX_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if gpu:
        import torch
        major, minor = torch.cuda.get_device_capability(0)
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # this GPU only
    return env


def step_info(out: Path, env: dict) -> None:
    text = subprocess.run([sys.executable, "-m", "fasttx", "info"], cwd=REPO, env=env, capture_output=True,
                          text=True).stdout
    smi = shutil.which("nvidia-smi")
    if smi:
        text += "\n" + subprocess.run([smi], capture_output=True, text=True).stdout
    (out / "info.txt").write_text(text)
    print(text, flush=True)


def step_build(out: Path, env: dict, gpu: bool) -> bool:
    script = ("import fasttx\n"
              "from fasttx import backends\n"
              "ext = backends.extension()\n"
              "print('extension:', ext.__file__ if ext else backends.extension_error())\n"
              "print('built_with_cuda:', bool(ext and ext.built_with_cuda))\n"
              "print('cuda backend:', backends.machine_reasons()['cuda'] or 'available')\n")
    rc, seconds = _run_logged([sys.executable, "-c", script], out / "build.log", env)
    log = (out / "build.log").read_text()
    ok = rc == 0 and "extension: " in log and (not gpu or "built_with_cuda: True" in log)
    _say(f"build {'ok' if ok else 'FAILED'} in {seconds:.0f} s (MAX_JOBS={env['MAX_JOBS']}, "
         f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST', 'unset: no GPU')})")
    return ok


def summarize_tests(log_text: str) -> dict:
    """{"by_op_backend": {op: {backend: {outcome: n}}}, "failed": [test ids], "total": {outcome: n}}."""
    by = defaultdict(lambda: defaultdict(Counter))
    failed, total = [], Counter()
    for line in log_text.splitlines():
        m = RESULT_LINE.match(line)
        if not m:
            continue
        path, test, outcome = m.groups()
        op = Path(path).stem.removeprefix("test_")
        found = next((m for m in (p.search(test) for p in BACKEND_IN_ID) if m), None)
        backend = found.group(1) if found else "other"
        by[op][backend][outcome.lower()] += 1
        total[outcome.lower()] += 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(f"{path}::{test}")
    return {"by_op_backend": {op: {b: dict(c) for b, c in v.items()} for op, v in sorted(by.items())},
            "failed": failed, "total": dict(total)}


def _tests_markdown(summary: dict, cut_off: bool) -> str:
    rows = ["| op | backend | passed | failed | skipped |", "|---|---|---|---|---|"]
    for op, per_backend in summary["by_op_backend"].items():
        for backend, counts in sorted(per_backend.items()):
            rows.append(f"| {op} | {backend} | {counts.get('passed', 0)} | "
                        f"{counts.get('failed', 0) + counts.get('error', 0)} | {counts.get('skipped', 0)} |")
    head = f"GPU tests: {summary['total']}" + (" (stopped at the budget: the rest did not run)" if cut_off else "")
    fails = "\n".join(f"- {t}" for t in summary["failed"]) or "none"
    return f"{head}\n\n" + "\n".join(rows) + f"\n\nFailed:\n{fails}\n"


def step_tests(out: Path, env: dict, budget: float) -> bool:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-rfE"]
    try:
        import pytest_timeout  # noqa: F401
        cmd += ["--timeout", "120"]
    except ImportError:
        _say("pytest-timeout is not installed: no per-test timeout, only the wall budget")
    rc, seconds = _run_logged(cmd, out / "gpu-tests.log", env, budget)
    summary = summarize_tests((out / "gpu-tests.log").read_text())
    summary.update(exit_code=rc, seconds=round(seconds, 1), budget_s=budget)
    (out / "gpu-tests.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu-tests.md").write_text(_tests_markdown(summary, rc is None))
    _say(f"GPU tests {summary['total']} in {seconds:.0f} s" + (" (cut off at the budget)" if rc is None else ""))
    return rc in (0, 5) and not summary["failed"]  # 5: nothing selected to run


def _peak_pct(row: dict, device_name: str) -> str:
    peaks = next((v for k, v in DATASHEET.items() if k in device_name), None)
    if peaks is None:
        return "n/a"
    if row.get("gbps") is not None:
        return f"{100 * row['gbps'] * 1e9 / peaks[0]:.0f}% HBM"
    if row.get("gflops") is not None:
        tflops_peak = peaks[2] if row.get("dtype") in ("bfloat16", "float16") else peaks[1]
        return f"{100 * row['gflops'] / 1e3 / tflops_peak:.0f}% {'bf16 TC' if tflops_peak == peaks[2] else 'fp32'}"
    return "n/a"


def bench_markdown(docs: dict) -> str:
    lines = ["| op | case | mode | provider | median ms [q20-q80] | TFLOP/s or GB/s | of datasheet peak | vs eager |",
             "|---|---|---|---|---|---|---|---|"]
    for op, doc in docs.items():
        for run in doc["runs"]:
            for r in run["rows"]:
                if r.get("status") != "ok":
                    continue
                case = ", ".join(f"{k}={r[k]}" for k in ("shape", "seq", "tokens", "dtype") if k in r)
                rate = f"{r['gflops'] / 1e3:.1f} TFLOP/s" if r.get("gflops") else (
                    f"{r['gbps']:.0f} GB/s" if r.get("gbps") else "n/a")
                lines.append(f"| {op} | {case} | {r['mode']} | {r['provider']} | {r['median_ms']:.3f} "
                             f"[{r['q20_ms']:.3f}-{r['q80_ms']:.3f}] | {rate} | {_peak_pct(r, doc['device_name'])} | "
                             f"{r.get('speedup', float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


def step_bench(out: Path, gpu: bool, budget: float) -> bool:
    import torch

    import bench
    from bench.ops import OPS

    started, docs, skipped = time.perf_counter(), {}, []
    for op in OPS:
        if time.perf_counter() - started > budget:
            skipped.append(op)
            continue
        if gpu:
            cases = [{**c, "dtype": d} for c in GPU_CASES[op] for d in DTYPES]
            docs.update(bench.run(ops=[op], level="quick", cases={op: cases}, device="cuda", reps=10,
                                  out_dir=str(out / "bench"), echo=False))
        else:  # the plumbing on tiny cases, without torch.compile's minutes
            docs.update(bench.run(ops=[op], level="smoke", device="cpu", threads=[1], reps=2,
                                  providers=["eager", "fasttx-torch"], out_dir=str(out / "bench"), echo=False))
    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    note = f"\nNot run, bench budget of {budget:.0f} s spent: {', '.join(skipped)}\n" if skipped else ""
    (out / "bench.md").write_text(f"# gpu-check benchmark on {device}, torch {torch.__version__}\n\n"
                                  + bench_markdown(docs) + note)
    _say(f"bench of {len(docs)} ops in {time.perf_counter() - started:.0f} s" + (f"; not run: {skipped}" if skipped else ""))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="the plumbing only, on the CPU (the default without a GPU)")
    parser.add_argument("--test-budget", type=float, default=240.0, help="seconds for the GPU tests (default 240)")
    parser.add_argument("--bench-budget", type=float, default=150.0, help="seconds for the benchmark (default 150)")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not gpu:
        _say("DRY RUN: " + ("--dry-run given" if args.dry_run else "no CUDA device here") +
             "; the same steps run on the CPU, and no GPU result comes of it")
    started = time.perf_counter()
    env = _environment(out, gpu)
    os.environ.update(env)  # the benchmark runs in this process: the same build cache and MAX_JOBS
    step_info(out, env)
    built = step_build(out, env, gpu)
    tests_ok = step_tests(out, env, args.test_budget) if built else False
    bench_ok = step_bench(out, gpu, args.bench_budget) if built else False
    _say(f"{'DRY RUN ' if not gpu else ''}done in {time.perf_counter() - started:.0f} s: build "
         f"{'ok' if built else 'FAILED'}, tests {'ok' if tests_ok else 'FAILED'}, bench {'ok' if bench_ok else 'FAILED'}; "
         f"outputs in {out}")
    return 0 if built and tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
