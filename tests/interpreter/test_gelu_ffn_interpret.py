"""fasttx.kernels.gelu_ffn's host functions, run by the Triton interpreter on CPU.

Checked against float64 PyTorch with tests/tolerance.py's rule: the kernels may
be off by at most a few times PyTorch's own error in the same dtype.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

from fasttx.kernels import gelu_ffn as kernels
from tolerance import DEFAULT_ATOL, assert_within_torch_error

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu}
GRADS = ("grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2")
# (M, D, H): one row, odd widths below one K block (D = 20, H = 37), two row blocks (77), and
# K = M over several K blocks in the weight grads.
SHAPES = [(1, 16, 64), (7, 20, 37), (77, 16, 37), (77, 20, 64)]


def _inputs(M, D, H, dtype, has_b1, has_b2, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g)
    w1 = torch.randn(H, D, generator=g) / D ** 0.5
    b1 = torch.randn(H, generator=g) if has_b1 else None
    w2 = torch.randn(D, H, generator=g) / H ** 0.5
    b2 = torch.randn(D, generator=g) if has_b2 else None
    grad_out = torch.randn(M, D, generator=g)
    return [t.to(dtype) if t is not None else None for t in (x, w1, b1, w2, b2, grad_out)]


def _kernel_run(x, w1, b1, w2, b2, grad_out, activation):
    """(out, preact), (grad_x, grad_w1, grad_b1, grad_w2, grad_b2) from the kernels."""
    out, preact = kernels.gelu_ffn_forward(x, w1, b1, w2, b2, activation)
    grads = kernels.gelu_ffn_backward(grad_out, x, preact, w1, w2, b1 is not None, b2 is not None, activation)
    return (out, preact), grads


def _torch_run(x, w1, b1, w2, b2, grad_out, activation, dtype=None):
    """The same through plain PyTorch in ``dtype`` (x's when None): truth in fp64, torch's own otherwise."""
    dtype = dtype or x.dtype
    params = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]
    x, w1, b1, w2, b2 = params
    preact = F.linear(x, w1, b1)
    out = F.linear(ACTIVATIONS[activation](preact), w2, b2)
    out.backward(grad_out.to(dtype))
    return (out.detach(), preact.detach()), tuple(p.grad if p is not None else None for p in params)


def _term_sums(x, w1, b1, w2, b2, grad_out, activation):
    """Per checked tensor, the largest sum of |terms| behind one of its elements (fp64)."""
    x, w1, w2, grad_out = (t.double() for t in (x, w1, w2, grad_out))
    preact = F.linear(x, w1, b1.double() if b1 is not None else None).requires_grad_()
    hidden = ACTIVATIONS[activation](preact)
    grad_h = torch.autograd.grad(hidden, preact, grad_out @ w2)[0].abs()
    hidden, grad_out = hidden.detach().abs(), grad_out.abs()
    sums = {"out": hidden @ w2.abs().t(), "preact": x.abs() @ w1.abs().t(), "grad_x": grad_h @ w1.abs(),
            "grad_w1": grad_h.t() @ x.abs(), "grad_b1": grad_h.sum(0), "grad_w2": grad_out.t() @ hidden,
            "grad_b2": grad_out.sum(0)}
    return {what: s.max().item() if s.numel() else 0.0 for what, s in sums.items()}


def _atol(truth, dtype, what, term_sum):
    """tolerance.py's atol plus two allowances torch's own error does not bound.

    bfloat16: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), so
    its results can be a full ulp off where torch's are at most half an ulp off; and the
    truncation errors of an intermediate (preact, act(preact), grad_h) all have one sign, so
    they add up along the next GEMM's K instead of cancelling: up to eps x its sum of |terms|.
    Bias grads: the kernel sums the M rows in another order than torch, and a sum's rounding
    error scales with sum |terms|, not with |sum|.
    """
    atol = DEFAULT_ATOL[dtype]
    if dtype == torch.bfloat16 and truth.numel() and truth.abs().max() > 0:
        atol += torch.finfo(dtype).eps * (2.0 ** torch.floor(torch.log2(truth.abs().max())).item() + term_sum)
    if what in ("grad_b1", "grad_b2"):
        atol += torch.finfo(torch.float32).eps * term_sum
    return atol


def _check(inputs, activation):
    outs, grads = _kernel_run(*inputs, activation)
    truth_outs, truth_grads = _torch_run(*inputs, activation, torch.float64)
    torch_outs, torch_grads = _torch_run(*inputs, activation)
    term_sums = _term_sums(*inputs, activation)
    checked = zip(("out", "preact") + GRADS, outs + grads, truth_outs + truth_grads, torch_outs + torch_grads)
    for what, o, t, r in checked:
        if t is None:
            assert o is None, f"{what}: expected None without the bias"
            continue
        assert_within_torch_error(o, t, r, factor=2.0 if what in ("out", "preact") else 3.0,
                                  atol=_atol(t, o.dtype, what, term_sums[what]), what=what)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-D{}-H{}".format(*s))
@pytest.mark.parametrize("activation", tuple(ACTIVATIONS))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "no_bias"))
def test_forward_backward(shape, activation, dtype, bias):
    seed = zlib.crc32(repr((shape, activation, dtype, bias)).encode())
    _check(_inputs(*shape, dtype, bias, bias, seed), activation)


@pytest.mark.parametrize("has_b1, has_b2", ((True, False), (False, True)))
def test_one_bias(has_b1, has_b2):
    _check(_inputs(7, 20, 37, torch.float32, has_b1, has_b2, seed=4), "gelu")


def test_float16():
    _check(_inputs(77, 20, 37, torch.float16, True, True, seed=5), "gelu_tanh")


def test_many_tiles():
    # 10 row blocks x 4 column blocks: more row blocks than GROUP_M, so the swizzle wraps.
    _check(_inputs(600, 16, 200, torch.float32, True, True, seed=6), "gelu")


@pytest.mark.parametrize("view", ("transposed", "expanded"))
def test_strided_grad_out(view):
    x, w1, b1, w2, b2, grad_out = _inputs(77, 20, 37, torch.bfloat16, True, True, seed=7)
    if view == "transposed":
        grad_out = grad_out.t().contiguous().t()
    else:
        grad_out = grad_out[:1].expand_as(grad_out)  # what autograd passes for out.sum(0)
    assert not grad_out.is_contiguous()
    _check([x, w1, b1, w2, b2, grad_out], "gelu")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bias_grads_deterministic(dtype):
    inputs = _inputs(77, 20, 64, dtype, True, True, seed=8)
    first = _kernel_run(*inputs, "gelu_tanh")[1]
    second = _kernel_run(*inputs, "gelu_tanh")[1]
    for what, a, b in zip(GRADS, first, second):
        assert torch.equal(a, b), what


def test_empty_rows():
    x, w1, b1, w2, b2, grad_out = _inputs(0, 16, 37, torch.float32, True, True, seed=9)
    (out, preact), grads = _kernel_run(x, w1, b1, w2, b2, grad_out, "gelu")
    assert out.shape == (0, 16) and preact.shape == (0, 37)
    for what, g, ref in zip(GRADS, grads, (x, w1, b1, w2, b2)):
        assert g.shape == ref.shape and not g.any(), what


def test_shape_errors():
    x, w1, b1, w2, b2, grad_out = _inputs(7, 20, 37, torch.float32, True, True, seed=10)
    with pytest.raises(ValueError, match=r"w1: shape \(37, 20\), expected \(H, 16\)"):
        kernels.gelu_ffn_forward(x[:, :16].contiguous(), w1, b1, w2, b2, "gelu")
    with pytest.raises(ValueError, match=r"w2: shape \(20, 36\), expected \(D2, 37\)"):
        kernels.gelu_ffn_forward(x, w1, b1, w2[:, :36], b2, "gelu")
    with pytest.raises(ValueError, match=r"b1: shape \(36,\), expected a contiguous \(37,\)"):
        kernels.gelu_ffn_forward(x, w1, b1[:36], w2, b2, "gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.gelu_ffn_forward(x, w1, b1, w2, b2, "silu")
    with pytest.raises(TypeError, match="w2: torch.float16"):
        kernels.gelu_ffn_forward(x, w1, b1, w2.half(), b2, "gelu")
    out, preact = kernels.gelu_ffn_forward(x, w1, b1, w2, b2, "gelu")
    with pytest.raises(ValueError, match=r"grad_out: shape \(7, 19\)"):
        kernels.gelu_ffn_backward(grad_out[:, :19], x, preact, w1, w2, True, True, "gelu")
    with pytest.raises(ValueError, match=r"preact: shape \(7, 36\)"):
        kernels.gelu_ffn_backward(grad_out, x, preact[:, :36], w1, w2, True, True, "gelu")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_config_is_listed(dtype):
    # tests/test_triton_aot.py compiles CONFIGS; the dispatcher must never return anything else.
    for M in (1, 7, 64, 77, 1000, 4096, 1 << 20):
        for N in (1, 16, 37, 64, 128, 768, 3072, 1 << 16):
            assert kernels._config(M, N, dtype) in kernels.CONFIGS, (M, N, dtype)
