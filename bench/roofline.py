"""What this machine can do at best, measured in the same run as the ops.

copy bandwidth: dst.copy_(src) into a preallocated buffer several times larger
than the last-level cache, counting read + write bytes. It is the ceiling a
memory-bound op can hope for, so ops report their GB/s as a % of it.

GEMM: fp32 matmul into a preallocated ``out=``, 2*n^3 FLOPs; the ceiling for
compute-bound ops.
"""
from __future__ import annotations

import glob

import torch

from bench import timing

MIN_COPY_BYTES = 64 << 20


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=0)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> dict:
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touches every page of dst once so the timed copies see no page faults
    times = [timing.sample(device, lambda: dst.copy_(src)) for _ in range(reps)]
    moved = 2 * src.numel() * src.element_size()
    stats = timing.quantiles(times)
    return {"bytes": moved, "reps": reps, "gbps": moved / stats["median"] / 1e9,
            "gbps_best": moved / min(times) / 1e9}


def gemm_gflops(device: torch.device, n: int, reps: int, dtype=torch.float32) -> dict:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: BLAS thread pool and packing buffers
    times = [timing.sample(device, lambda: torch.matmul(a, b, out=out)) for _ in range(reps)]
    stats = timing.quantiles(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "gflops": 2 * n ** 3 / stats["median"] / 1e9, "gflops_best": 2 * n ** 3 / min(times) / 1e9}


def measure(device: torch.device, copy_bytes: int = 0, gemm_n: int = 2048, reps: int = 10) -> dict:
    """Copy bandwidth and GEMM throughput; copy_bytes=0 picks max(64 MiB, 4 x last-level cache)."""
    copy_bytes = copy_bytes or max(MIN_COPY_BYTES, 4 * last_level_cache_bytes(device))
    return {"copy": copy_bandwidth(device, copy_bytes, reps),
            "gemm": gemm_gflops(device, gemm_n, max(3, reps // 2))}
