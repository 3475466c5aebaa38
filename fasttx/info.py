"""`python -m fasttx info`: what this machine offers fasttx, and why a backend is missing."""
from __future__ import annotations

import platform

import torch

from fasttx import backends

_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "sve")


def _cpu_model_and_flags():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, [f for f in _CPU_FLAGS if f in flags]


def allocator() -> str:
    """'tcmalloc' when libtcmalloc is mapped into this process (e.g. via LD_PRELOAD), else 'glibc'.

    Large CPU timings depend on it (glibc pays page faults on fresh big blocks),
    so the benchmarks and `python -m fasttx compare` record it.
    """
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "glibc"
    except OSError:
        return "glibc"


def report() -> str:
    import fasttx

    lines = [f"fasttx {fasttx.__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    terr = backends.triton_error()
    if terr:
        lines.append(f"triton: not available ({terr})")
    else:
        import triton
        lines.append(f"triton {triton.__version__}" + (" (interpreter)" if backends.triton_interpreting() else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("CUDA devices: none")
    model, flags = _cpu_model_and_flags()
    lines.append(f"CPU: {model}; {torch.get_num_threads()} torch threads; "
                 f"ATen capability {torch.backends.cpu.get_cpu_capability()}; flags: {' '.join(flags) or 'none'}")
    ext = backends.extension()
    if ext is None:
        lines.append(f"fasttx._C: missing: {backends.extension_error()}")
    else:
        lines.append(f"fasttx._C: built for torch {ext.torch_version} {'with' if ext.built_with_cuda else 'without'} CUDA, "
                     f"{ext.__file__}")
    lines.append("backends (in priority order):")
    reasons = backends.machine_reasons()
    for name in backends.BACKENDS:
        why = reasons[name]
        lines.append(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)
