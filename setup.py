"""Builds fasttx and its one C++/CUDA extension, fasttx._C.

The CPU kernels (csrc/cpu) are always compiled. The CUDA kernels (csrc/cuda)
are compiled when torch was built with CUDA and nvcc is found; set
FASTTX_BUILD_CUDA=0 or 1 to force the choice. CUDA targets default to sm_80
and sm_90 and follow TORCH_CUDA_ARCH_LIST when it is set.
FASTTX_BUILD_EXTENSION=0 builds no extension at all: fasttx then runs its
triton and torch backends only.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _want_cuda():
    forced = os.environ.get("FASTTX_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"FASTTX_BUILD_CUDA must be 0 or 1, got {forced!r}")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script in
    # /usr/local/bin makes that guess /usr/local, which has no CUDA headers.
    toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    found = torch.version.cuda is not None and toolkit
    if forced == "1" and not found:
        raise RuntimeError(
            "FASTTX_BUILD_CUDA=1 but cannot build CUDA: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME} "
            "(set CUDA_HOME to the toolkit, e.g. /usr/local/cuda)"
        )
    return found if forced is None or forced == "" else forced == "1"


def _cuda_include_dirs():
    # /usr/local/cuda may lack the cuBLAS/cuSPARSE headers that ATen's CUDA
    # headers include; the pip wheels of nvidia-* ship them in site-packages.
    import site

    dirs = []
    for base in site.getsitepackages():
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return [d for d in dirs if os.path.isdir(d)]


def _cublaslt_link():
    # gelu_ffn calls cuBLASLt; the nvidia-* wheels ship only libcublasLt.so.N, so link it by file name.
    import site

    for base in site.getsitepackages():
        for lib in sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libcublasLt.so.*"))):
            return [os.path.dirname(lib)], [":" + os.path.basename(lib)]
    return [], ["cublasLt"]


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if os.environ.get("FASTTX_BUILD_EXTENSION", "1") == "0":
        return []

    cxx_flags = ["-O3", "-fopenmp"]
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return [CppExtension("fasttx._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cublaslt_dirs, cublaslt = _cublaslt_link()
    return [CUDAExtension(
        "fasttx._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + _cuda_include_dirs(),
        define_macros=[("FASTTX_WITH_CUDA", "1")],
        library_dirs=cublaslt_dirs,
        libraries=cublaslt,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--threads", "0"]},
        extra_link_args=["-fopenmp"],
    )]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="fasttx",
    version="0.1.0",
    description="Hand-written Triton, CUDA and C++ kernels for Transformers",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    # Every package under fasttx/ (a hand-kept list once left fasttx.patching out), plus kernels/.
    packages=find_packages(include=["fasttx", "fasttx.*"]) + ["fasttx.kernels"],
    package_dir={"fasttx.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "bench": ["matplotlib"], "test": ["pytest"], "hf": ["transformers>=4.48"]},
)
