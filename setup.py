"""Builds fasttx. pyproject.toml declares the build; this file holds what cannot be static.

By default the wheel is pure Python and ships the C++/CUDA sources: fasttx
compiles its extension, fasttx._C, on first use against the torch it runs
under, and caches it (fasttx/extension.py). So `pip install .` works with
build isolation, where no torch is importable, and the extension always
matches the user's torch.

FASTTX_BUILD_EXTENSION=1 compiles fasttx._C now instead, against the torch
of the build environment, so use it with `--no-build-isolation`:
    FASTTX_BUILD_EXTENSION=1 pip install --no-build-isolation -e .
The CPU kernels (csrc/cpu) are always compiled. The CUDA kernels (csrc/cuda)
are compiled when torch was built with CUDA and a toolkit of the same major
version is found (else the build says why it skipped them); FASTTX_BUILD_CUDA=0
or 1 forces the choice. CUDA targets default to sm_80 and sm_90 and follow
TORCH_CUDA_ARCH_LIST when it is set.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _recipe():
    # fasttx/_build.py by path: importing the fasttx package would import torch.
    spec = importlib.util.spec_from_file_location("fasttx_build", os.path.join(ROOT, "fasttx", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name, default):
    value = os.environ.get(name, "") or default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _cuda_home(recipe, torch):
    forced = os.environ.get("FASTTX_BUILD_CUDA", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"FASTTX_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        print("fasttx: CUDA kernels skipped: FASTTX_BUILD_CUDA=0", file=sys.stderr)
        return None
    home, why = recipe.cuda_plan(torch.version.cuda)
    if home is None:
        if forced == "1":
            raise RuntimeError(f"FASTTX_BUILD_CUDA=1 but CUDA cannot be built: {why}")
        print(f"fasttx: CUDA kernels skipped: {why}", file=sys.stderr)
    return home


def _ahead_of_time():
    """(ext_modules, cmdclass) for FASTTX_BUILD_EXTENSION=1."""
    try:
        import torch
    except ImportError as e:
        raise RuntimeError("FASTTX_BUILD_EXTENSION=1 compiles against the installed torch, and none is importable "
                           f"({e}): install torch first and build with `pip install --no-build-isolation`") from e
    recipe = _recipe()
    cuda_home = _cuda_home(recipe, torch)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # cpp_extension reads it when first imported
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.relpath(f, ROOT) for f in recipe.sources(Path(csrc), cuda_home is not None)]
    common = dict(include_dirs=[csrc], extra_link_args=recipe.LINK_FLAGS)
    if cuda_home is None:
        ext = CppExtension("fasttx._C", sources, extra_compile_args={"cxx": recipe.CXX_FLAGS}, **common)
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", recipe.DEFAULT_CUDA_ARCHS)
        lib_dirs, libs = recipe.cublaslt_link()
        common["include_dirs"] = common["include_dirs"] + recipe.wheel_cuda_include_dirs()
        ext = CUDAExtension("fasttx._C", sources, define_macros=[("FASTTX_WITH_CUDA", "1")], library_dirs=lib_dirs,
                            libraries=libs, extra_compile_args={"cxx": recipe.CXX_FLAGS,
                                                                "nvcc": recipe.NVCC_FLAGS + ["--threads", "0"]},
                            **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ahead_of_time() if _flag("FASTTX_BUILD_EXTENSION", "0") else ([], {})
setup(
    # Every package under fasttx/ (a hand-kept list once left fasttx.patching out); kernels/ and csrc/ keep their
    # place in the repository and install under fasttx/. Neither has an __init__.py, so neither can ever be
    # imported as a top-level `kernels` or `csrc` that hides an installed package of that name (a regular
    # package beats a namespace portion). In a checkout, and so in an editable install, the symlink
    # fasttx/kernels -> ../kernels makes `fasttx.kernels` importable: setuptools' editable finder cannot
    # map a namespace package inside a regular one.
    packages=find_packages(include=["fasttx", "fasttx.*"]) + ["fasttx.kernels", "fasttx.csrc"],
    package_dir={"fasttx.kernels": "kernels", "fasttx.csrc": "csrc"},
    package_data={"fasttx.csrc": ["*.cpp", "*.h", "*/*.cpp", "*/*.h", "*/*.cu", "*/*.cuh", "*/*/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
