"""Every backend's why_not tells the truth about the dtypes its kernels take, checked on a CPU.

On a GPU a kernel that is offered a dtype it does not dispatch raises in auto mode instead of
leaving the input to the next backend (gelu_ffn once claimed float64 on CUDA). The CUDA files
cannot run here, but their dispatch can be read: a why_not that accepts float64 must belong to a
.cu file that instantiates it, and one that refuses it must belong to a file that does not.
"""
import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fasttx import backends

ROOT = Path(__file__).resolve().parents[1]
OPS = ("attention", "bias_gelu", "cross_entropy", "gelu_ffn", "layer_norm", "softmax")
OPS += ("apply_rotary",)
OPS += ("glu", "glu_ffn")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fake(device, dtype, shape=(2, 3, 8, 64)):
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=shape)


def _why_not(impl, device, dtype):
    x = _fake(device, dtype)
    return impl.why_not(x, x, x)


def _cuda_dispatches_float64(op):
    source = (ROOT / "csrc" / "cuda" / f"{op}.cu").read_text()
    return bool(re.search(r"\bkDouble\b|AT_DISPATCH_FLOATING_TYPES", source))


@pytest.mark.parametrize("op", OPS)
def test_cuda_why_not_matches_the_dtypes_the_cu_file_dispatches(op):
    impls = {impl.backend: impl for impl in importlib.import_module(f"fasttx.ops.{op}").IMPLEMENTATIONS}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _why_not(impls["cuda"], "cuda", dtype) is None, (op, dtype)
    accepts = _why_not(impls["cuda"], "cuda", torch.float64) is None
    assert accepts == _cuda_dispatches_float64(op), (
        f"{op}: the cuda why_not {'accepts' if accepts else 'refuses'} float64 but csrc/cuda/{op}.cu "
        f"{'does not dispatch' if accepts else 'dispatches'} it")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_mode_on_cuda_always_finds_a_backend(op, dtype):
    """The torch backend is last and takes everything, so auto mode never runs out on a CUDA tensor."""
    impls = importlib.import_module(f"fasttx.ops.{op}").IMPLEMENTATIONS
    assert impls[-1].backend == "torch" and _why_not(impls[-1], "cuda", dtype) is None
    triton = {impl.backend: impl for impl in impls}["triton"]
    assert (_why_not(triton, "cuda", dtype) is None) == (dtype != torch.float64), (op, dtype)


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_a_backend_refuses_the_other_device(backend):
    other = "cpu" if backend == "cuda" else "cuda"
    for op in OPS:
        impl = {i.backend: i for i in importlib.import_module(f"fasttx.ops.{op}").IMPLEMENTATIONS}[backend]
        assert _why_not(impl, other, torch.float32), (op, backend)
    assert backends.device_reason(backend, torch.device(other))
