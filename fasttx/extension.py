"""fasttx._C, the C++/CUDA extension: found, checked against this torch, or built for it.

A compiled extension only works under the torch whose headers built it, so
fasttx never trusts one blindly:

1. an ahead-of-time build (``FASTTX_BUILD_EXTENSION=1 pip install ...``,
   what CI and packagers use) is taken when it was built for this torch;
2. otherwise fasttx compiles one just in time, on first use, with torch's
   ``cpp_extension.load`` and ninja, and caches it per torch version, CUDA
   build and source hash under ``$FASTTX_CACHE_DIR`` (default
   ``~/.cache/fasttx``). ``FASTTX_BUILD_EXTENSION=0`` forbids this.

When an extension exists but cannot be used, or cannot be built, fasttx warns
once with the reason and the fix; the ops then run on their other backends, and
a forced ``cpu`` or ``cuda`` backend raises with the same reason.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from fasttx import _build

JIT_NAME = "fasttx_C"
REBUILD_HINT = ("reinstall fasttx under this torch (`pip install --force-reinstall --no-deps fasttx`, or "
                "`pip install --no-build-isolation -e .` in a checkout)")


class ExtensionWarning(UserWarning):
    """fasttx._C exists but cannot be used, or could not be built: its backends are off."""


def torch_release() -> str:
    return torch.__version__.split("+")[0]


def cache_root() -> Path:
    explicit = os.environ.get("FASTTX_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fasttx"


def _jit_cuda_plan() -> tuple[Optional[str], str]:
    # Just in time, CUDA is compiled only where it can run: for this machine's GPUs.
    if torch.version.cuda is not None and not torch.cuda.is_available():
        return None, "no CUDA device is available"
    return _build.cuda_plan(torch.version.cuda)


def _source_hash(files: list[str], flags: list[str]) -> str:
    digest = hashlib.sha256("\0".join([torch.__version__, str(torch.version.cuda)] + flags).encode())
    csrc = _build.csrc_dir()
    headers = sorted(p for p in csrc.rglob("*") if p.suffix in (".h", ".cuh"))
    for path in [Path(f) for f in files] + headers:
        digest.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _import_built(so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(JIT_NAME, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_just_in_time() -> ModuleType:
    """Compile fasttx._C for this torch (or take the cached build) and return it."""
    cuda_home, why_no_cuda = _jit_cuda_plan()
    csrc = _build.csrc_dir()
    files = _build.sources(csrc, with_cuda=cuda_home is not None)
    cflags = list(_build.CXX_FLAGS) + (["-DFASTTX_WITH_CUDA=1"] if cuda_home else [])
    cuda_flags = list(_build.NVCC_FLAGS) + ["-DFASTTX_WITH_CUDA=1"] if cuda_home else []
    build_dir = cache_root() / f"torch-{torch.__version__}-{_source_hash(files, cflags + cuda_flags)}"
    so, done = build_dir / f"{JIT_NAME}.so", build_dir / "built"
    if done.is_file() and so.is_file():
        return _import_built(so)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension when first imported, and when it runs nvcc
    from torch.utils import cpp_extension  # imported only to compile: it guesses CUDA_HOME, noisily, on import

    build_dir.mkdir(parents=True, exist_ok=True)
    kind = "C++ and CUDA" if cuda_home else f"C++ (CPU only: {why_no_cuda})"
    print(f"fasttx: compiling its {kind} extension for torch {torch.__version__} into {build_dir}; "
          "once per torch version, a few minutes", file=sys.stderr, flush=True)
    extra_ldflags = list(_build.LINK_FLAGS)
    include_paths = [str(csrc)]
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before with another guess
        lib_dirs, libs = _build.cublaslt_link()
        extra_ldflags += [f"-L{d}" for d in lib_dirs] + [f"-l{lib}" for lib in libs]
        include_paths += _build.wheel_cuda_include_dirs()
    module = cpp_extension.load(
        name=JIT_NAME, sources=files, extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
        extra_ldflags=extra_ldflags, extra_include_paths=include_paths, build_directory=str(build_dir),
        with_cuda=cuda_home is not None, verbose=False)
    done.write_text(torch.__version__ + "\n")
    return module


def _load() -> tuple[Optional[ModuleType], Optional[str], bool]:
    """(module, None, _) or (None, why, warn): warn is False only where the user chose no extension."""
    problems = []
    try:
        module = importlib.import_module("fasttx._C")
    except ModuleNotFoundError as e:
        if e.name != "fasttx._C":  # found, but something it needs is not
            problems.append(f"the installed fasttx._C cannot load ({e})")
    except ImportError as e:
        problems.append(f"the installed fasttx._C cannot load ({e})")
    else:
        built_for = getattr(module, "torch_version", "an unknown version")
        if built_for == torch_release():
            return module, None, False
        problems.append(f"the installed fasttx._C was built for torch {built_for}, this is torch {torch_release()}")
    if os.environ.get("FASTTX_BUILD_EXTENSION") == "0":
        why = "; ".join(problems) or "fasttx._C was not built"
        return None, f"{why}, and FASTTX_BUILD_EXTENSION=0 forbids building it at run time; {REBUILD_HINT}", bool(problems)
    try:
        module = build_just_in_time()
    except Exception as e:  # a compiler error, no compiler, no ninja, unwritable cache: all end the same way
        text = str(e).strip().splitlines()
        problems.append(f"building it for this torch failed ({type(e).__name__}: {text[-1] if text else ''})")
        return None, ("; ".join(problems) + ". `python -c 'import fasttx.extension as e; e.build_just_in_time()'` "
                      "shows the compiler's output; the build needs a C++ compiler and ninja"), True
    if problems:
        warnings.warn(f"fasttx: {'; '.join(problems)}; using a just-in-time build for this torch instead. "
                      f"To remove this message, {REBUILD_HINT}", ExtensionWarning, stacklevel=3)
    return module, None, False


@functools.lru_cache(maxsize=None)
def load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(fasttx._C, None), or (None, why not). Warns once when an extension exists but is unusable or fails to build."""
    module, why, warn = _load()
    if module is not None:
        sys.modules["fasttx._C"] = module  # so `import fasttx._C` finds whichever build is in use
        sys.modules["fasttx"]._C = module
        return module, None
    if warn:
        warnings.warn(f"fasttx: the cpu and cuda backends are off: {why}", ExtensionWarning, stacklevel=3)
    return None, why
