"""Backend choice for every fasttx op. This module alone decides.

Each op keeps a priority list of implementations. Every implementation can
say *why* it cannot serve an input (a string), or None when it can. In auto
mode the first that can serve wins; a forced backend that cannot raises an
error carrying the reasons and never falls back.

Force a backend with ``FASTTX_BACKEND=<name>`` or ``with fasttx.use_backend(name):``.
The context manager wins over the environment variable.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Sequence

import torch

from fasttx import _build
from fasttx import extension as _extension

BACKENDS = ("triton", "cuda", "cpu", "torch")
AUTO = "auto"

_forced_stack: list[str] = []


def _check_name(name: str) -> str:
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"backend must be one of {(AUTO,) + BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` ('triton', 'cuda', 'cpu', 'torch' or 'auto') inside the block.

    Process-wide rather than thread-local, because autograd may run a CUDA
    backward on another thread and it must see the same choice.
    """
    _forced_stack.append(_check_name(name))
    try:
        yield
    finally:
        _forced_stack.pop()


def requested_backend() -> str:
    """The backend the user asked for: the innermost use_backend, else $FASTTX_BACKEND, else auto."""
    if _forced_stack:
        return _forced_stack[-1]
    return _check_name(os.environ.get("FASTTX_BACKEND", AUTO) or AUTO)


# ---- what this machine offers -------------------------------------------------

def extension():
    """fasttx._C built for this torch, or None. See fasttx.extension and extension_error()."""
    return _extension.load()[0]


def extension_error() -> Optional[str]:
    return _extension.load()[1]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def machine_reasons() -> dict[str, Optional[str]]:
    """For each backend, None if it can run on this machine, else why not."""
    return dict(_machine_reasons())


@functools.lru_cache(maxsize=None)
def _machine_reasons() -> Mapping[str, Optional[str]]:
    """machine_reasons(), read once per process, since every op call asks: the extension,
    the GPU and TRITON_INTERPRET (which triton itself reads once, at import) stay as they are."""
    ext_err = extension_error()
    reasons: dict[str, Optional[str]] = {"torch": None}
    reasons["cpu"] = ext_err
    if ext_err:
        reasons["cuda"] = ext_err
    elif not extension().built_with_cuda:
        why = _build.cuda_plan(torch.version.cuda)[1] or "FASTTX_BUILD_CUDA=0, or no CUDA device when it was built"
        reasons["cuda"] = f"fasttx._C was built without CUDA ({why})"
    elif not torch.cuda.is_available():
        reasons["cuda"] = "no CUDA device is available"
    else:
        reasons["cuda"] = None
    terr = triton_error()
    if terr:
        reasons["triton"] = terr
    elif not torch.cuda.is_available() and not triton_interpreting():
        reasons["triton"] = "no CUDA device is available (set TRITON_INTERPRET=1 to run Triton on the CPU, for tests)"
    else:
        reasons["triton"] = None
    return MappingProxyType(reasons)


def cpu_backend_takes_cpu_tensors(requested: str) -> bool:
    """Whether choose() sends CPU tensors of the usual dtypes to the 'cpu' implementation: for
    eager fast paths that skip choose(). In auto mode only the Triton interpreter comes first."""
    machine = _machine_reasons()
    if machine["cpu"]:
        return False
    return requested == "cpu" or (requested == AUTO and not (machine["triton"] is None and triton_interpreting()))


# ---- per-op implementations ------------------------------------------------------

@dataclass(frozen=True)
class Implementation:
    """One backend's version of one op.

    ``why_not(*tensors)`` returns None when this implementation can serve
    the input and a short reason otherwise; the machine-level reason (not
    built, no GPU) is checked first by the dispatcher.
    """
    backend: str
    forward: Callable
    backward: Callable
    why_not: Callable[..., Optional[str]]

    def __post_init__(self):
        if self.backend == "triton":
            object.__setattr__(self, "forward", on_tensors_device(self.forward))
            object.__setattr__(self, "backward", on_tensors_device(self.backward))


def on_tensors_device(launch: Callable) -> Callable:
    """``launch`` run with its first tensor's CUDA device current.

    Triton launches on the current device, not on the tensors' (the C++ kernels enter a
    CUDAGuard): tensors on cuda:1 while cuda:0 is current would fault or run on the wrong GPU.
    """
    @functools.wraps(launch)
    def run(*args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda" or device.index == torch.cuda.current_device():
            return launch(*args)
        with torch.cuda.device(device):
            return launch(*args)
    return run


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """The device rule shared by all ops: which tensors each backend takes."""
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device.type}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device.type}"
    if backend == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"the triton backend takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    return None


def device_only(backend: str) -> Callable[..., Optional[str]]:
    """The why_not of an implementation that serves every dtype of its op on its own device."""
    return lambda x, *rest: device_reason(backend, x.device)


def up_to_float32(backend: str) -> Callable[..., Optional[str]]:
    """The why_not of kernels that serve their device's float16, bfloat16 and float32, not float64."""
    def why_not(x: torch.Tensor, *rest) -> Optional[str]:
        return device_reason(backend, x.device) or (
            f"the {backend} kernels take float16, bfloat16 or float32, got float64" if x.dtype == torch.float64 else None)
    return why_not


# The Triton kernels: CUDA tensors (or the interpreter's CPU ones) up to float32.
triton_why_not = up_to_float32("triton")


class BackendUnavailableError(RuntimeError):
    pass


def choose(op: str, impls: Sequence[Implementation], requested: str, *args) -> Implementation:
    """Pick the implementation of ``op`` for ``args``. ``requested`` is 'auto' or a backend name."""
    _check_name(requested)
    machine = _machine_reasons()
    reasons = {}
    for impl in impls:
        why = machine[impl.backend] or impl.why_not(*args)
        if requested == impl.backend:
            if why:
                raise BackendUnavailableError(
                    f"fasttx.{op}: backend {requested!r} was forced but cannot serve this input: {why}")
            return impl
        if requested == AUTO and why is None:
            return impl
        reasons[impl.backend] = why
    if requested != AUTO:
        raise BackendUnavailableError(f"fasttx.{op} has no {requested!r} implementation")
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise BackendUnavailableError(f"fasttx.{op}: no backend can serve this input ({detail})")
