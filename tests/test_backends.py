"""Backend choice: auto, forcing by context manager and environment, and honest refusals."""
import subprocess
import sys

import pytest
import torch

import fasttx
from fasttx import backends


def test_forced_backend_that_cannot_serve_raises_with_reason():
    x, bias = torch.randn(2, 8), torch.randn(8)
    with fasttx.use_backend("cuda"), pytest.raises(fasttx.BackendUnavailableError) as err:
        fasttx.bias_gelu(x, bias)
    message = str(err.value)
    assert "'cuda' was forced" in message
    assert ("CUDA" in message) or ("cuda" in message.split("forced", 1)[1])


def test_forced_triton_on_cpu_tensor_says_how_to_interpret():
    if backends.triton_interpreting():
        pytest.skip("under the interpreter triton serves CPU tensors")
    with fasttx.use_backend("triton"), pytest.raises(fasttx.BackendUnavailableError, match="TRITON_INTERPRET"):
        fasttx.bias_gelu(torch.randn(2, 8), torch.randn(8))


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTTX_BACKEND", "cuda")
    assert backends.requested_backend() == "cuda"
    with pytest.raises(fasttx.BackendUnavailableError):
        fasttx.bias_gelu(torch.randn(2, 8), torch.randn(8))
    with fasttx.use_backend("torch"):  # the context manager wins over the environment
        fasttx.bias_gelu(torch.randn(2, 8), torch.randn(8))


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with fasttx.use_backend("tpu"):
            pass
    monkeypatch.setenv("FASTTX_BACKEND", "gpu")
    with pytest.raises(ValueError, match="got 'gpu'"):
        fasttx.bias_gelu(torch.randn(2, 8), torch.randn(8))


def test_use_backend_nests_and_restores():
    assert backends.requested_backend() == "auto"
    with fasttx.use_backend("torch"):
        with fasttx.use_backend("cpu"):
            assert backends.requested_backend() == "cpu"
        assert backends.requested_backend() == "torch"
    assert backends.requested_backend() == "auto"


def test_backward_runs_on_the_backend_the_forward_was_forced_to():
    """The choice is recorded with the op, so backward outside the block keeps it."""
    x = torch.randn(3, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    with fasttx.use_backend("torch"):
        y = fasttx.bias_gelu(x, bias)
    with fasttx.use_backend("cuda"):  # would raise if backward re-dispatched
        y.sum().backward()
    assert x.grad is not None


def test_info_lists_every_backend_with_a_reason():
    out = subprocess.run([sys.executable, "-m", "fasttx", "info"], capture_output=True, text=True, check=True).stdout
    for name in fasttx.BACKENDS:
        assert f"  {name} " in out
    assert "torch 2." in out and "CPU:" in out
    if not torch.cuda.is_available():
        assert "unavailable: " in out


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device; a triton Implementation enters the tensors' own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    seen = []
    impl = backends.Implementation("triton", lambda *a: seen.append("fwd"), lambda *a: seen.append("bwd"),
                                   backends.triton_why_not)
    with FakeTensorMode():
        on_1, on_0 = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    impl.forward(3, on_1)
    impl.backward(on_0)
    impl.forward(torch.empty(2))
    assert seen == ["fwd", "bwd", "fwd"] and entered == [torch.device("cuda:1")]
    cpu = backends.Implementation("cpu", len, len, backends.device_only("cpu"))
    assert cpu.forward is len  # the C++ kernels guard the device themselves


@pytest.mark.gpu
def test_triton_on_a_second_gpu():
    if torch.cuda.device_count() < 2 or backends.machine_reasons()["triton"]:
        pytest.skip("needs two CUDA devices and triton")
    x, b = torch.randn(64, 96, device="cuda:1"), torch.randn(96, device="cuda:1")
    with torch.cuda.device(0), fasttx.use_backend("triton"):
        y = fasttx.bias_gelu(x, b)
    torch.testing.assert_close(y, torch.nn.functional.gelu(x + b))
