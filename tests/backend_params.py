"""Which (device, backend) pairs a reference test runs, and why the rest skip.

Rung (a) runs every backend this machine has on CPU tensors; rung (e) runs
the same tests on CUDA tensors and skips, saying why, where there is no GPU.
"""
import pytest
import torch

from fasttx import backends

CPU_BACKENDS = ("cpu", "torch")
CUDA_BACKENDS = ("triton", "cuda", "torch")


def device_backend_params(cpu_backends=CPU_BACKENDS, cuda_backends=CUDA_BACKENDS):
    """(device, backend) pairs for the backends an op implements."""
    params = []
    for backend in cpu_backends:
        params.append(pytest.param("cpu", backend, id=f"cpu-{backend}"))
    for backend in cuda_backends:
        params.append(pytest.param("cuda", backend, id=f"cuda-{backend}", marks=pytest.mark.gpu))
    return params


def skip_unless_runnable(device: str, backend: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU test (rung e): no CUDA device on this machine")
    why = backends.machine_reasons()[backend]
    if why is not None:
        if backend == "cpu":  # the C++ extension must always be built; its absence is a failure
            pytest.fail(f"the cpu backend is unavailable: {why}")
        pytest.skip(f"backend {backend} unavailable: {why}")


def skip_unless_free_memory(gib: float):
    """Tests past 2^31 elements need several GiB; skip, saying so, rather than swap or get killed."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    free = int(info["MemAvailable"].split()[0]) / 2**20
    if free < gib:
        pytest.skip(f"needs {gib} GiB free, have {free:.1f}")
