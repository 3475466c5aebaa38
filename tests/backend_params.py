"""Which (device, backend) pairs a reference test runs, and why the rest skip.

Rung (a) runs every backend this machine has on CPU tensors; rung (e) runs
the same tests on CUDA tensors and skips, saying why, where there is no GPU.
"""
import pytest
import torch

from fasttx import backends

CPU_BACKENDS = ("cpu", "torch")
CUDA_BACKENDS = ("triton", "cuda", "torch")


def device_backend_params():
    params = []
    for backend in CPU_BACKENDS:
        params.append(pytest.param("cpu", backend, id=f"cpu-{backend}"))
    for backend in CUDA_BACKENDS:
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
