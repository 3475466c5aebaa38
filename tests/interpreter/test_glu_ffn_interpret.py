"""fasttx.kernels.glu_ffn's host functions, run by the Triton interpreter on CPU.

Checked against float64 PyTorch with tests/tolerance.py's rule: the kernels may
be off by at most a few times PyTorch's own error in the same dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.kernels import glu_ffn as kernels
from fasttx.ops.glu import activation_ref
from fasttx.ops.glu_ffn import glu_ffn_ref
from tolerance import assert_within_torch_error, rounding_atol

NAMES = ("out", "gate", "up", "grad_x", "grad_w_gate", "grad_b_gate", "grad_w_up", "grad_b_up", "grad_w_down",
         "grad_b_down")
# (M, D, H): one row, odd widths below one K block (D = 20, H = 37), two row blocks (77), and
# K = M over several K blocks in the weight grads.
SHAPES = [(1, 16, 40), (7, 20, 37), (77, 16, 37)]


def _inputs(M, D, H, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g)
    w_gate, w_up = (torch.randn(H, D, generator=g) / D ** 0.5 for _ in range(2))
    w_down = torch.randn(D, H, generator=g) / H ** 0.5
    b_gate, b_up = (torch.randn(H, generator=g) if has else None for has in bias[:2])
    b_down = torch.randn(D, generator=g) if bias[2] else None
    grad_out = torch.randn(M, D, generator=g)
    return [t.to(dtype) if t is not None else None for t in (x, w_gate, b_gate, w_up, b_up, w_down, b_down, grad_out)]


def _kernel_run(x, w_gate, b_gate, w_up, b_up, w_down, b_down, grad_out, activation):
    out, gate, up = kernels.glu_ffn_forward(x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation)
    grads = kernels.glu_ffn_backward(grad_out, x, gate, up, w_gate, w_up, w_down, b_gate is not None,
                                     b_up is not None, b_down is not None, activation)
    return (out, gate, up) + tuple(grads)


def _torch_run(x, w_gate, b_gate, w_up, b_up, w_down, b_down, grad_out, activation, dtype=None):
    dtype = dtype or x.dtype
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (x, w_gate, b_gate, w_up, b_up, w_down, b_down)]
    x, w_gate, b_gate, w_up, b_up, w_down, b_down = leaves
    gate, up = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
    out = F.linear(activation_ref(gate, activation) * up, w_down, b_down)
    out.backward(grad_out.to(dtype))
    return (out.detach(), gate.detach(), up.detach()) + tuple(t.grad if t is not None else None for t in leaves)


def _atol(truth, dtype, what, term_sum):
    """tolerance.py's rounding_atol (one ulp at the peak: at M = 7 rows torch's own weight-gradient sums
    can land within a fraction of an ulp by chance, seen 0.6 ulp against the kernel's 3), plus for bfloat16 the interpreter's truncating casts (one ulp, and one
    eps of the sum of |terms| behind an element: truncation errors of an intermediate share a sign,
    so they add up along the next GEMM's K) and for bias grads the summation order (eps x sum |terms|)."""
    atol = rounding_atol(truth, dtype)
    if dtype == torch.bfloat16 and truth.numel() and truth.abs().max() > 0:
        atol += torch.finfo(dtype).eps * (2.0 ** torch.floor(torch.log2(truth.abs().max())).item() + term_sum)
    if what.startswith("grad_b"):
        atol += torch.finfo(torch.float32).eps * term_sum
    return atol


def _check(inputs, activation, dtype):
    got = _kernel_run(*inputs, activation)
    truth = _torch_run(*inputs, activation, dtype=torch.float64)
    torch_out = _torch_run(*inputs, activation)
    # The largest sum of |terms| behind an element of any checked tensor (fp64): a bound for all.
    x, w_gate, _, w_up, _, w_down, _, grad_out = (t.double().abs() if t is not None else None for t in inputs)
    term_sum = max((grad_out @ w_down).max().item() * max(w_gate.sum(0).max(), w_up.sum(0).max()).item(),
                   (x @ w_gate.t()).max().item() * w_down.sum(1).max().item() * 4, grad_out.sum(0).max().item(),
                   1.0) * max(1, x.shape[0] // 16)
    for name, o, t, p in zip(NAMES, got, truth, torch_out):
        if t is None:
            assert o is None, name
            continue
        assert_within_torch_error(o, t, p, factor=2 if name in ("out", "gate", "up") else 3,
                                  atol=_atol(t, dtype, name, term_sum), what=f"{dtype} {activation} {name}")


@pytest.mark.parametrize("activation,M,D,H", [("silu",) + s for s in SHAPES] + [("gelu", 77, 16, 37),
                                                                              ("gelu_tanh", 7, 20, 37)], ids=str)
def test_float32_matches_reference(activation, M, D, H):
    _check(_inputs(M, D, H, torch.float32, (True, True, True), M + D + H), activation, torch.float32)


@pytest.mark.parametrize("bias", [(False, False, False), (True, False, True)], ids=str)
def test_without_some_biases(bias):
    _check(_inputs(7, 20, 37, torch.float32, bias, 3), "silu", torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(dtype):
    _check(_inputs(7, 20, 37, dtype, (True, True, True), 5), "silu", dtype)


def test_through_the_op_with_a_strided_x():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 40, generator=g)[:, ::2].requires_grad_()
    w_gate, w_up = (torch.randn(24, 20, generator=g).requires_grad_() for _ in range(2))
    w_down = torch.randn(20, 24, generator=g).requires_grad_()
    with fasttx.use_backend("triton"):
        out = fasttx.glu_ffn(x, w_gate, w_up, w_down)
        out.sum().backward()
    grads = [t.grad for t in (x, w_gate, w_up, w_down)]
    for t in (x, w_gate, w_up, w_down):
        t.grad = None
    ref = glu_ffn_ref(x, w_gate, w_up, w_down)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads, [t.grad for t in (x, w_gate, w_up, w_down)], rtol=1e-4, atol=1e-4)


def test_configs_cover_every_choice():
    for dual in (False, True):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for M, N in ((1, 1), (4096, 5632), (200, 200)):
                assert kernels._config(M, N, dtype, dual) in kernels.CONFIGS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_largest_tiles(monkeypatch, dtype):
    """Aligned operands and a one-program "wave": the dispatcher picks the largest tile of each kind,
    which the small shapes above never reach (they take the smallest)."""
    monkeypatch.setattr(kernels, "_WAVE", 1)
    inputs = _inputs(48, 32, 64, dtype, (True, True, True), 7)
    assert kernels._config(48, 64, dtype, True) is kernels.CONFIGS_BY_KIND[(True, dtype)][0]
    assert kernels._aligned((48, 64, 32, 32, 1), inputs[:2])
    _check(inputs, "silu", dtype)
