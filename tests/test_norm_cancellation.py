"""The norm family where the exact answer comes from an exact cancellation.

At normalized size N = 1, s - mean(s) and g - mean(g) are exactly 0, so layer_norm's output is
its bias and its grad_input is 0; on a constant row s - mean(s) is 0 and rstd = 1/sqrt(eps)
(316 at eps = 1e-5) amplifies whatever is left of it. A kernel that rounds one quantity in one
place and not in another (the compiler contracting g = dy * w into an FMA with the later
g - mean(g), while mean(g) summed the rounded g) leaves (dy*w - round(dy*w)) * rstd there, a
silent error of up to 1e-5 in float32. Checked against float64 with tests/tolerance.py, and
where the truth is exactly 0, for exactly 0.
"""
import pytest
import torch

import fasttx

from backend_params import device_backend_params, skip_unless_runnable
from norm_cases import fasttx_fn, run, torch_fn
from tolerance import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]
AFFINE = ["weight_bias", "weight", "bias", "none"]


def _params(op, affine, n, dtype, device):
    w = (1 + 0.5 * torch.randn(n, device=device)).to(dtype) if affine in ("weight_bias", "weight") else None
    b = (0.5 * torch.randn(n, device=device)).to(dtype) if affine in ("weight_bias", "bias") else None
    return w, (None if "rms" in op else b)


def _check(device, backend, op, x, r, w, b, grads):
    with fasttx.use_backend(backend):
        outs, in_grads = run(fasttx_fn(op), [x, r, w, b], grads)
    truth_outs, truth_grads = run(torch_fn(op), [x, r, w, b], grads, cast=torch.float64)
    torch_outs, torch_grads = run(torch_fn(op), [x, r, w, b], grads)
    what = f"{op} {backend} {x.dtype} N={x.shape[-1]}"
    for i, (o, t, p) in enumerate(zip(outs, truth_outs, torch_outs)):
        assert_within_torch_error(o, t, p, factor=2, what=f"{what} output {i}")
    for name, o, t, p in zip("x residual weight bias".split(), in_grads, truth_grads, torch_grads):
        if t is not None:
            assert_within_torch_error(o, t, p, factor=3, what=f"{what} grad {name}")
    return outs, in_grads


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalized_size_one(device, backend, op, affine, dtype):
    """N = 1: layer_norm's y is its bias (0 without) and grad_input is exactly 0, in every row."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(1)
    rows = 333  # several vectors of rows, and a tail
    x = (3 * torch.randn(rows, 1, device=device)).to(dtype)
    r = torch.randn_like(x) if op.startswith("add_") else None
    w, b = _params(op, affine, 1, dtype, device)
    grads = [torch.randn(rows, 1, device=device).to(dtype) for _ in range(2)]
    outs, in_grads = _check(device, backend, op, x, r, w, b, grads)
    if "rms" not in op:  # the RMS norms have no mean to cancel: y = x / sqrt(x^2 + eps)
        assert torch.equal(outs[0], (b if b is not None else torch.zeros_like(x[0])).expand_as(x)), \
            f"{op} {backend} {dtype}: N = 1 output is not the bias"
        # add_layer_norm's inputs get grad_s (the gradient of its output s = x + residual) and nothing else
        expected = grads[1] if r is not None else torch.zeros_like(x)
        for name, g in zip(("x", "residual"), in_grads[:2 if r is not None else 1]):
            assert torch.equal(g, expected), f"{op} {backend} {dtype}: N = 1 grad {name} is off by " \
                f"{(g.double() - expected.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("affine", ["weight_bias", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 7, 64, 768, 1537])
def test_constant_rows(device, backend, op, affine, dtype, n):
    """Every row constant (a different constant each): s - mean(s) cancels exactly, rstd = 316."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(n)
    rows = 9
    x = (3 * torch.randn(rows, 1, device=device)).to(dtype).expand(rows, n).contiguous()
    r = None
    if op.startswith("add_"):  # x + r constant along the row, from non-constant x and r
        r = (torch.randn(rows, 1, device=device).to(dtype) - x).to(dtype)
        x, r = x.clone(), r.expand(rows, n).contiguous()
    w, b = _params(op, affine, n, dtype, device)
    grads = [torch.randn(rows, n, device=device).to(dtype) for _ in range(2)]
    _check(device, backend, op, x, r, w, b, grads)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 7, 64, 768])
def test_constant_gradient_on_constant_rows(device, backend, op, dtype, n):
    """Constant rows, a weight and a grad_output constant along the row: g = dy * w is the same
    everywhere, so g - mean(g) = 0 and grad_input = 0 in exact arithmetic, however inexact dy * w."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(n)
    rows = 9
    x = (3 * torch.randn(rows, 1, device=device)).to(dtype).expand(rows, n).contiguous()
    r = torch.zeros_like(x) if op == "add_layer_norm" else None
    w = torch.full((n,), 1.1, device=device).to(dtype)  # 1.1 is inexact: dy * w rounds
    b = torch.randn(n, device=device).to(dtype)
    grads = [torch.randn(rows, 1, device=device).to(dtype).expand(rows, n).contiguous(),
             torch.randn(rows, n, device=device).to(dtype)]
    _check(device, backend, op, x, r, w, b, grads)


def test_triton_backward_is_compiled_without_fma_contraction():
    """The Triton norm backward, compiled as norm_backward launches it, has no fused multiply-add:
    its source has none, so any would be a contraction of g = gy * w into g - mean(g)."""
    triton_aot = pytest.importorskip("triton_aot")  # tests/triton_aot.py; skips when triton is missing
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from fasttx.kernels import layer_norm as kernels

    cfg = kernels._tile_config(1024)
    constexprs = dict(RMS=False, HAS_GRAD_S=True, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], LOOPED=False)
    arg_types = {"GY": "*fp32", "GS": "*fp32", "S": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "W": "*fp32",
                 "DX": "*fp32", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "M": "i32", "N": "i32",
                 "rows_per_prog": "i32"}
    src = ASTSource(fn=kernels._norm_bwd_kernel, signature=triton_aot.signature(arg_types, "fp32", constexprs),
                    constexprs=constexprs)

    def ptx(**options):
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], **options}).asm["ptx"]

    assert "fma.rn.f32" in ptx(enable_fp_fusion=True), "the check no longer sees contraction: revisit it"
    assert "fma.rn.f32" not in ptx(**kernels.BWD_OPTIONS)


def test_normalized_size_one_default_path():
    """The same through the default dispatch (the eager C++ path of csrc/cpu/layer_norm_eager.cpp)."""
    torch.manual_seed(0)
    x = torch.randn(5, 1, requires_grad=True)
    w, b = torch.randn(1), torch.randn(1)
    y = fasttx.layer_norm(x, (1,), w, b, 1e-5)
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))
