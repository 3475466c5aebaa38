"""A whole benchmark run: every allocator asked for, every thread count, every op; then the outputs.

The allocator is fixed when a process starts, so a run under another one
than this process has happens in a child process (LD_PRELOAD), which gets its
job as a JSON file and hands its results back as one.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

import fasttx
from fasttx import backends

from bench import allocator, harness, report
from bench.ops import OPS
from bench.spec import LEVELS, normalize_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")


def run(ops: Optional[list] = None, level: str = "full", cases: Optional[dict] = None,
        threads: Optional[list] = None, allocator_choice: Optional[str] = None, device: str = "auto",
        out_dir: str = RESULTS_DIR, reps: Optional[int] = None, providers: Optional[list] = None,
        echo: bool = True) -> dict:
    """Run the suite and write its outputs; returns {op: results document}.

    ops: names in bench.ops.OPS (default all). level: 'full', 'quick' or 'smoke'.
    cases: {op: [case dict, ...]} to replace the op's sweep. threads: CPU thread
    counts (default 1 and all cores). allocator_choice: 'glibc', 'tcmalloc' or
    'both' (default: both when tcmalloc is installed; quick and smoke: this process's).
    reps: fixed number of timing rounds. providers: only these provider names.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    dev = resolve_device(device)
    job = {
        "ops": list(ops or OPS),
        "level": level,
        "cases": {op: [normalize_case(c) for c in (cases or {}).get(op) or OPS[op].sweep(level)]
                  for op in (ops or OPS)},
        "threads": list(threads or harness.default_threads(dev)),
        "device": str(dev), "reps": reps, "providers": providers,
    }
    choice = allocator_choice or _default_allocator(level)
    started = time.perf_counter()
    if echo:
        print(allocator.WHY)
        if not allocator.find_tcmalloc():
            print(allocator.INSTALL_HINT)
        elif choice not in ("both", "tcmalloc"):
            print(f"running under {choice} only; `--allocator both` compares with tcmalloc")
    merged = {op: [] for op in job["ops"]}

    def keep(op: str, run: dict) -> None:
        # Each op's files are rewritten as each of its runs ends, marked incomplete, so that a run stopped
        # after an hour leaves what it measured; the end of the run writes them complete.
        merged[op].append(run)
        doc = _document(op, dev, merged[op], level, time.perf_counter() - started)
        doc["meta"]["complete"] = False
        report.write(doc, out_dir)

    for alloc in allocator.expand(choice):
        if alloc == allocator.current():
            run_job(job, on_run=keep)
        else:
            for op, runs in _run_child(job, alloc).items():
                merged[op] += runs
    docs = {op: _document(op, dev, runs, level, time.perf_counter() - started) for op, runs in merged.items()}
    for doc in docs.values():
        doc["meta"]["complete"] = True
    for doc in docs.values():
        paths = report.write(doc, out_dir)
        if echo:
            print(report.tables(doc))
            print(report.summary(doc))
            print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    if echo:
        print(allocator.WHY)
        print(f"total time {time.perf_counter() - started:.0f} s")
    return docs


def _default_allocator(level: str) -> str:
    """The full suite compares both allocators when tcmalloc is installed; quick and smoke keep this process's."""
    return allocator.default_choice() if level == "full" else allocator.current()


def run_job(job: dict, on_run=None) -> dict:
    """Run a job under this process's allocator: {op: [run, ...]}; on_run as for harness.run_suite."""
    settings = harness.SETTINGS[job["level"]]
    if job.get("reps"):
        settings = dataclasses.replace(settings, min_reps=job["reps"], max_reps=job["reps"])
    specs = [OPS[op] for op in job["ops"]]
    cases = {op: [normalize_case(c) for c in cs] for op, cs in job["cases"].items()}
    return harness.run_suite(specs, cases, job["threads"], torch.device(job["device"]), settings,
                             job.get("providers"), on_run)


def _run_child(job: dict, alloc: str) -> dict:
    """Run ``job`` in `python -m bench --child` under ``alloc``."""
    print(f"running the suite again in a child process under {alloc} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        cmd = [sys.executable, "-m", "bench", "--child", job_path, out_path]
        proc = subprocess.run(cmd, env=allocator.env_for(alloc), cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"the {alloc} child run failed (exit {proc.returncode}): {' '.join(cmd)}")
        with open(out_path) as f:
            results = json.load(f)
    got = {run["allocator"] for runs in results.values() for run in runs}
    if got != {alloc}:
        print(f"warning: asked for {alloc} but the child ran under {', '.join(sorted(got))}")
    return results


def child_main(job_path: str, out_path: str):
    with open(job_path) as f:
        job = json.load(f)
    with open(out_path, "w") as f:
        json.dump(run_job(job), f)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_model()}"


def device_slug(dev: torch.device) -> str:
    """'cpu', or the CUDA device name as a folder name (e.g. nvidia-a100-sxm4-80gb)."""
    if dev.type != "cuda":
        return dev.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _document(op: str, dev: torch.device, runs: list, level: str, elapsed_s: float) -> dict:
    for run in runs:
        for row in run["rows"]:
            row.update(normalize_case({k: row[k] for k in OPS[op].params}))
    return {"op": op, "device": device_slug(dev), "device_name": device_name(dev), "level": level,
            "formula": OPS[op].formula, "meta": metadata(elapsed_s), "runs": runs}


def metadata(elapsed_s: float) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench" if sys.argv[0].endswith("__main__.py") else sys.argv[0],
                             *sys.argv[1:]]),
        "elapsed_s": round(elapsed_s, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fasttx": fasttx.__version__,
        "fasttx_commit": _git_commit(),
        "cpu_model": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "backends": backends.machine_reasons(),
        "allocator_note": allocator.WHY,
    }


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
