"""Rung (d) of the verification ladder: the CUDA kernels compile, fit in registers, and link.

There may be no GPU, so CUDA code is proven by the compiler alone. Every .cu
file under csrc/cuda is compiled by nvcc for sm_80 and sm_90 with the flags
setup.py gives it, and ptxas must report every kernel for both architectures
with no register spills. A second test checks that the installed fasttx._C
was linked with the CUDA kernels.
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from fasttx import _build, backends

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted(Path(p).relative_to(ROOT).as_posix() for p in glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
ARCHS = ("sm_80", "sm_90")  # setup.py DEFAULT_CUDA_ARCHS
# What setup.py passes for "nvcc" (less --threads, which would interleave the ptxas
# reports of the two archs) plus what torch's BuildExtension adds to every CUDA source.
SETUP_NVCC_FLAGS = _build.NVCC_FLAGS + ["-DFASTTX_WITH_CUDA=1"]
TORCH_NVCC_FLAGS = cpp_extension.COMMON_NVCC_FLAGS + [
    "-std=c++20", "-Xcompiler", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


# fp32 instructions that --use_fast_math substitutes for accurate math: tanh.approx.f32 for tanhf
# (2^-11 relative, far outside fp32's 2x-of-PyTorch rule), div.approx/div.full for a / b, and
# sqrt.approx for sqrtf. ex2.approx, rcp.approx and rsqrt.approx are not in the list: the accurate
# library functions use them inside their own refinements, and the code asks for __expf and rsqrtf
# by name where their few ulp are covered.
UNWANTED_APPROXIMATIONS = re.compile(r"\b(?:tanh|div|sqrt)\.approx(?:\.ftz)?\.f32\b|\bdiv\.full(?:\.ftz)?\.f32\b")


def _nvcc():
    home, _ = _build.find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK) else None


def _include_dirs():
    try:
        torch_dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6 spelled it include_paths(cuda=True)
        torch_dirs = cpp_extension.include_paths(cuda=True)
    return [str(ROOT / "csrc")] + torch_dirs + [sysconfig.get_paths()["include"]] + _build.wheel_cuda_include_dirs()


def _ptxas_report(text):
    """{(kernel, arch): {"registers": int, "spill_stores": int, "spill_loads": int}} from `-Xptxas -v` output."""
    report, current = {}, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line):
            current = report.setdefault((m.group(1), m.group(2)), {})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
            current = None
    return report


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return dict(zip(names, names))
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


@pytest.mark.skipif(not CU_FILES, reason="no .cu files under csrc/cuda")
@pytest.mark.parametrize("cu_file", CU_FILES)
def test_kernels_compile_for_sm80_sm90_without_spills(cu_file, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]  # both archs in one nvcc call
    cmd = ([nvcc, "-c", str(ROOT / cu_file), "-o", str(tmp_path / "out.o"), "-Xptxas", "-v", "-keep", "-keep-dir", str(tmp_path)]
           + gencode + TORCH_NVCC_FLAGS + SETUP_NVCC_FLAGS + [f"-I{d}" for d in _include_dirs()])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {cu_file}:\n{proc.stderr[-6000:]}"

    report = _ptxas_report(proc.stdout + proc.stderr)
    kernels = sorted({k for k, _ in report})
    names = _demangle(kernels)
    table = "\n".join(f"{a} {r.get('registers', '?'):>4} regs  spill st/ld {r.get('spill_stores', '?')}/"
                      f"{r.get('spill_loads', '?')}  {names[k]}" for (k, a), r in sorted(report.items(), key=lambda i: (i[0][1], names[i[0][0]])))
    print(f"\n{cu_file}:\n{table}")
    assert kernels, f"ptxas reported no kernels for {cu_file}:\n{proc.stderr[-3000:]}"
    missing = [f"{names[k]} for {a}" for k in kernels for a in ARCHS if (k, a) not in report]
    assert not missing, f"kernels not compiled for every arch: {missing}"
    incomplete = [f"{names[k]} for {a}" for (k, a), r in report.items() if len(r) != 3]
    assert not incomplete, f"could not read ptxas registers/spills for: {incomplete}\n{proc.stderr[-3000:]}"
    spilling = [f"{names[k]} for {a}: {r}" for (k, a), r in report.items() if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "kernels spill registers:\n" + "\n".join(spilling)

    ptx = sorted(tmp_path.glob("*.ptx"))
    assert len(ptx) == len(ARCHS), f"nvcc -keep left {[p.name for p in ptx]}"
    found = {f"{p.name}: {m}" for p in ptx for m in UNWANTED_APPROXIMATIONS.findall(p.read_text())}
    assert not found, (f"{cu_file} compiles to approximate instructions that fp32 results cannot afford "
                       f"(a fast-math flag, or a __ intrinsic): {sorted(found)}")


def test_installed_extension_linked_cuda_kernels():
    if _nvcc() is None:
        pytest.skip("nvcc not found, so fasttx._C cannot have been built with CUDA")
    if torch.version.cuda is None:
        pytest.skip("torch was built without CUDA, so fasttx._C is CPU-only by design")
    ext = backends.extension()
    if ext is None:
        pytest.fail(f"fasttx._C is unavailable: {backends.extension_error()}")
    if not ext.built_with_cuda:
        reason = (f"the installed fasttx._C ({ext.__file__}) is a CPU-only build (built_with_cuda is False, "
                  "e.g. built with FASTTX_BUILD_CUDA=0); rebuild with CUDA_HOME=/usr/local/cuda "
                  "FASTTX_BUILD_EXTENSION=1 FASTTX_BUILD_CUDA=1 pip install --no-build-isolation -e . to check the CUDA link")
        if os.environ.get("FASTTX_BUILD_CUDA") == "1":  # CUDA was asked for: a CPU-only build is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    for name in ("bias_gelu_fwd_cuda", "bias_gelu_bwd_cuda", "layer_norm_fwd_cuda", "layer_norm_bwd_cuda",
                 "gelu_ffn_fwd_cuda", "gelu_ffn_bwd_cuda", "attention_fwd_cuda", "attention_bwd_cuda",
                 "softmax_fwd_cuda", "softmax_bwd_cuda", "cross_entropy_fwd_cuda",
                 "cross_entropy_bwd_cuda",
                 "apply_rotary_fwd_cuda", "apply_rotary_bwd_cuda", "glu_fwd_cuda", "glu_bwd_cuda",
                 "glu_ffn_fwd_cuda", "glu_ffn_bwd_cuda"):
        assert callable(getattr(ext, name, None)), f"fasttx._C is built with CUDA but lacks {name}"
    assert callable(getattr(ext, "linear_cross_entropy_rows_cuda", None)), \
        "fasttx._C is built with CUDA but lacks linear_cross_entropy_rows_cuda"
