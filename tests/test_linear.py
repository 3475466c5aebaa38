"""fasttx.ops.linear: F.linear, with fp32 GEMMs on oneDNN where csrc/cpu/matmul.h chooses it.

Both GEMM paths run on every machine through the tests' switch, and so do
gelu_ffn's, which share them. The truth is float64; PyTorch's own fp32
F.linear (MKL here) is the yardstick (tests/tolerance.py).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.gelu_ffn import gelu_ffn_ref
from fasttx.ops.linear import linear
from backend_params import skip_unless_runnable
from tolerance import assert_within_torch_error


def _cpu_is_intel():
    with open("/proc/cpuinfo") as f:
        return "GenuineIntel" in f.read()


@pytest.fixture(params=["onednn", "blas"])
def cpu_gemm(request):
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    previous = _C.set_onednn_fp32_gemm_enabled(request.param == "onednn")
    yield request.param
    _C.set_onednn_fp32_gemm_enabled(previous)


def _run(fn, x, w, b, grad):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


# Odd and prime sizes; one row; a reduction long enough for oneDNN's chunks to add up (3072, 1537);
# the one-row, k >= 3072 product that crashed torch 2.14.1's mkldnn_matmul (csrc/cpu/matmul.cpp).
SHAPES = [((1,), 7, 5), ((7,), 77, 33), ((2, 77), 384, 1152), ((1000,), 1537, 77), ((3, 100), 3072, 768),
          ((1,), 3072, 768), ((1537,), 16, 16), ((64,), 128, 17)]


@pytest.mark.parametrize("lead,d_in,d_out", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_truth(cpu_gemm, lead, d_in, d_out, bias):
    torch.manual_seed(d_in + d_out)
    x = torch.randn(*lead, d_in)
    w = torch.randn(d_out, d_in) / d_in ** 0.5
    b = torch.randn(d_out) if bias else None
    grad = torch.randn(*lead, d_out)
    ours = _run(linear, x, w, b, grad)
    truth = _run(F.linear, x.double(), w.double(), b.double() if bias else None, grad.double())
    torch_out = _run(F.linear, x, w, b, grad)
    for name, o, t, p in zip(("out", "grad_x", "grad_w", "grad_b"), ours, truth, torch_out):
        if t is None:
            assert o is None
            continue
        assert_within_torch_error(o, t, p, factor=2, what=f"{cpu_gemm} {name} {(lead, d_in, d_out)}")
    assert torch.equal(ours[0], _run(linear, x, w, b, grad)[0]), "two runs differ"


def test_noncontiguous_broadcast_and_empty_inputs(cpu_gemm):
    torch.manual_seed(0)
    w, b = torch.randn(40, 96), torch.randn(40)
    x_t = torch.randn(96, 50).t()                       # a transposed view
    x_b = torch.randn(1, 96).expand(33, 96)             # a broadcast row
    for x in (x_t, x_b, torch.randn(0, 96), torch.randn(4, 0, 96)):
        assert_within_torch_error(linear(x, w, b), F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b),
                                  what=f"{cpu_gemm} {tuple(x.shape)} strides {x.stride()}")
    w_t = torch.randn(96, 40).t()                       # a transposed weight
    assert_within_torch_error(linear(x_t, w_t, b), F.linear(x_t.double(), w_t.double(), b.double()),
                              F.linear(x_t, w_t, b), what=f"{cpu_gemm} transposed weight")


def test_is_f_linear_itself_where_the_gemms_are_atens():
    """bf16, autocast, a forced torch backend, a 1-D weight, a shape error: F.linear's results and errors."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    previous = _C.set_onednn_fp32_gemm_enabled(True)
    try:
        torch.manual_seed(0)
        x, w, b = torch.randn(64, 96), torch.randn(40, 96), torch.randn(40)
        xb, wb, bb = (t.bfloat16() for t in (x, w, b))
        assert torch.equal(linear(xb, wb, bb), F.linear(xb, wb, bb))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        with fasttx.use_backend("torch"):
            assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        w_1d = torch.randn(96)  # F.linear takes a 1-D weight too (a matrix-vector product)
        assert torch.equal(linear(x, w_1d), F.linear(x, w_1d))
        with pytest.raises(RuntimeError) as ours:
            linear(x, torch.randn(40, 95), b)
        with pytest.raises(RuntimeError) as torchs:
            F.linear(x, torch.randn(40, 95), b)
        assert str(ours.value) == str(torchs.value)
    finally:
        _C.set_onednn_fp32_gemm_enabled(previous)


def test_gelu_ffn_on_both_gemm_paths(cpu_gemm):
    """gelu_ffn's CPU GEMMs are cpu/matmul.h's: within the error rule on either, over several row blocks."""
    torch.manual_seed(0)
    d, h = 96, 3072
    x = torch.randn(2100, d)
    params = [torch.randn(h, d) / d ** 0.5, torch.randn(h), torch.randn(d, h) / h ** 0.5, torch.randn(d)]
    grad = torch.randn(2100, d)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *params)]
        out = fn(*leaves)
        out.backward(grad.to(dtype))
        return (out.detach(),) + tuple(t.grad for t in leaves)

    with fasttx.use_backend("cpu"):
        ours = run(fasttx.gelu_ffn, torch.float32)
    truth, torch_out = run(gelu_ffn_ref, torch.float64), run(gelu_ffn_ref, torch.float32)
    for name, o, t, p in zip(("out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"), ours, truth, torch_out):
        assert_within_torch_error(o, t, p, factor=2 if name == "out" else 3, what=f"{cpu_gemm} {name}")


def test_default_is_onednn_on_avx512_cpus_not_intels():
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    setting = os.environ.get("FASTTX_CPU_GEMM", "")
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    wanted = {"onednn": True, "blas": False}.get(setting, avx512 and not _cpu_is_intel())
    assert _C.onednn_fp32_gemm_enabled() == wanted


@pytest.mark.parametrize("setting", ["onednn", "blas", "bogus"])
def test_environment_switch(setting):
    skip_unless_runnable("cpu", "cpu")
    code = "from fasttx import _C; print(_C.onednn_fp32_gemm_enabled())"
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTTX_CPU_GEMM=setting),
                          capture_output=True, text=True, timeout=120)
    if setting == "bogus":
        assert done.returncode != 0 and "FASTTX_CPU_GEMM must be 'onednn' or 'blas', got 'bogus'" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(setting == "onednn")]


def test_cpu_entry_points_name_bad_input():
    """fasttx._C's linear functions (called directly, not through F.linear's own checks) say what is wrong."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match=r"linear_fwd_cpu: weight must have shape \(out_features, 16\)"):
        _C.linear_fwd_cpu(x, torch.randn(4, 15), None)
    with pytest.raises(RuntimeError, match=r"linear_fwd_cpu: bias must be \(4,\)"):
        _C.linear_fwd_cpu(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match=r"linear_fwd_cpu: x must be 2-D"):
        _C.linear_fwd_cpu(torch.randn(2, 8, 16), w, None)
    with pytest.raises(RuntimeError, match=r"linear_bwd_cpu: grad_out must have shape \(8, 4\)"):
        _C.linear_bwd_cpu(torch.randn(8, 5), x, w, True, True, False)
