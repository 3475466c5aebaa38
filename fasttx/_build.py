"""How fasttx._C is compiled: its sources, flags and CUDA toolkit.

One recipe for both builds: setup.py's ahead-of-time build (FASTTX_BUILD_EXTENSION=1,
for CI and packagers) and the just-in-time build on first use (fasttx/extension.py),
which is what a plain `pip install` gets. setup.py loads this file by path, before
torch is importable, so nothing here imports torch or fasttx at module level.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
from pathlib import Path
from typing import Optional

CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# No --use_fast_math: it turns tanhf into tanh.approx.f32 (about 2^-11 relative) and divisions into
# div.approx, which fp32 results cannot afford. The fast paths that are worth it are spelled out in
# the code (__expf, rsqrtf), and tests/test_cuda_build.py checks the PTX for any other approximation.
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
STANDARD_CUDA_HOME = "/usr/local/cuda"


def csrc_dir() -> Path:
    """The C++/CUDA sources: fasttx/csrc in an installed wheel, ../csrc in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"fasttx's C++ sources are missing: neither {here / 'csrc'} nor {here.parent / 'csrc'} "
                            "holds bindings.cpp; reinstall fasttx")


def sources(csrc: Path, with_cuda: bool) -> list[str]:
    files = sorted(glob.glob(str(csrc / "cpu" / "*.cpp"))) + [str(csrc / "bindings.cpp")]
    return files + (sorted(glob.glob(str(csrc / "cuda" / "*.cu"))) if with_cuda else [])


def _has_headers(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def find_cuda_home() -> tuple[Optional[str], str]:
    """(toolkit root, how it was found) or (None, why none was found).

    torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script in
    /usr/local/bin makes that guess /usr/local, which has no headers, so the
    standard location is tried before giving up.
    """
    tried = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if _has_headers(home):
                return home, f"${var}"
            tried.append(f"${var}={home}")
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _has_headers(guess):
            return guess, "the nvcc on PATH"
        tried.append(f"{guess} (from nvcc on PATH)")
    if _has_headers(STANDARD_CUDA_HOME):
        return STANDARD_CUDA_HOME, "the standard location"
    tried.append(STANDARD_CUDA_HOME)
    return None, "no CUDA toolkit with headers at " + ", ".join(tried)


def nvcc_version(cuda_home: str) -> Optional[tuple[int, int]]:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_plan(torch_cuda: Optional[str]) -> tuple[Optional[str], str]:
    """(CUDA_HOME to build with, '') or (None, why CUDA is skipped), for torch built with CUDA `torch_cuda`."""
    if torch_cuda is None:
        return None, "torch was built without CUDA"
    home, how = find_cuda_home()
    if home is None:
        return None, how
    version = nvcc_version(home)
    if version is None:
        return None, f"{home}/bin/nvcc does not run or print its version"
    if str(version[0]) != torch_cuda.split(".")[0]:
        return None, (f"nvcc {version[0]}.{version[1]} at {home} and torch's CUDA {torch_cuda} differ in major version; "
                      "point CUDA_HOME at a matching toolkit")
    return home, ""


def wheel_cuda_include_dirs() -> list[str]:
    # /usr/local/cuda may lack the cuBLAS/cuSPARSE headers that ATen's CUDA
    # headers include; the pip wheels of nvidia-* ship them in site-packages.
    dirs = []
    for base in site.getsitepackages():
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return [d for d in dirs if os.path.isdir(d)]


def cublaslt_link() -> tuple[list[str], list[str]]:
    """(library dirs, libraries) for cuBLASLt, which gelu_ffn calls."""
    # The nvidia-* wheels ship only libcublasLt.so.N, so link it by file name.
    for base in site.getsitepackages():
        for lib in sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcublasLt.so.*"))):
            return [os.path.dirname(lib)], [":" + os.path.basename(lib)]
    return [], ["cublasLt"]

