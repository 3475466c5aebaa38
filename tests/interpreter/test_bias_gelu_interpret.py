"""fasttx.bias_gelu on the triton backend, run by the Triton interpreter on CPU.

Checked against float64 PyTorch with tests/tolerance.py's rule: the kernel may
be off by at most a few times PyTorch's own error in the same dtype.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.kernels import bias_gelu as kernels
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
APPROX = ("none", "tanh")
# N covers one-lane rows, odd widths, one partial tile, and several column blocks (1537 -> 7 x 256).
SHAPES = [lead + (n,) for lead in ((1,), (3, 5), (77,)) for n in (1, 7, 77, 1000, 1537)]


def _triton_run(x, b, approximate, grad=None):
    """(y, grad_x, grad_bias) from the triton backend; grads are None without ``grad``."""
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_()
    with fasttx.use_backend("triton"):
        y = fasttx.bias_gelu(x, b, approximate)
        if grad is None:
            return y.detach(), None, None
        y.backward(grad)
    return y.detach(), x.grad, b.grad


def _torch_run(x, b, approximate, grad, dtype=None):
    """The same through plain PyTorch, in ``dtype`` (x's when None): truth in fp64, torch's own otherwise."""
    dtype = dtype or x.dtype
    x = x.detach().to(dtype).requires_grad_()
    b = b.detach().to(dtype).requires_grad_()
    y = F.gelu(x + b, approximate=approximate)
    y.backward(grad.to(dtype))
    return y.detach(), x.grad, b.grad


def _ulp(truth, dtype):
    """One ulp of ``dtype`` at the largest |truth|."""
    if not truth.numel():
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(truth.abs().max())).item()


def _atol(truth, dtype, what, grad_x_truth):
    """tolerance.py's atol plus two allowances torch's own error does not bound.

    bfloat16: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), so
    its results can be a full ulp off where torch's are at most half an ulp off.
    grad_bias: the kernel sums M fp32 terms in another order than torch (the interpreter's
    np.sum adds rows one by one), and a sum's rounding error scales with sum |terms|, not
    with |sum|; torch's cascade sum can land on the truth by chance (seen for N = 1).
    """
    atol = DEFAULT_ATOL[dtype]
    if dtype == torch.bfloat16:
        atol += _ulp(truth, dtype)
    if what == "grad_bias" and truth.numel():
        abs_sums = grad_x_truth.abs().reshape(-1, truth.shape[0]).sum(0)
        atol += torch.finfo(torch.float32).eps * abs_sums.max().item()
    return atol


def _check(x, b, approximate, grad):
    out = _triton_run(x, b, approximate, grad)
    truth = _torch_run(x, b, approximate, grad, torch.float64)
    torch_out = _torch_run(x, b, approximate, grad)
    for what, o, t, r, factor in zip(("y", "grad_x", "grad_bias"), out, truth, torch_out, (2.0, 3.0, 3.0)):
        assert_within_torch_error(o, t, r, factor=factor, atol=_atol(t, o.dtype, what, truth[1]), what=what)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(shape, approximate, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, approximate, dtype)).encode()))
    x = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(shape[-1], generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    _check(x, b, approximate, grad)


@pytest.mark.parametrize("view", ("transposed", "sliced"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(view, dtype):
    g = torch.Generator().manual_seed(1)
    if view == "transposed":
        x = torch.randn(77, 33, generator=g).to(dtype).t()      # (33, 77), column-major
        grad = torch.randn(77, 33, generator=g).to(dtype).t()
    else:
        x = torch.randn(12, 154, generator=g).to(dtype)[:, ::2]  # (12, 77), stride 2
        grad = torch.randn(12, 154, generator=g).to(dtype)[:, 1::2]
    assert not x.is_contiguous() and not grad.is_contiguous()
    b = torch.randn(x.shape[-1], generator=g).to(dtype)
    _check(x, b, "tanh", grad)


@pytest.mark.parametrize("shape", ((0, 7), (4, 0), (2, 0, 5)))
def test_empty(shape):
    x = torch.randn(shape)
    b = torch.randn(shape[-1])
    y, grad_x, grad_bias = _triton_run(x, b, "none", torch.randn(shape))
    assert y.shape == x.shape and grad_x.shape == x.shape
    assert torch.equal(grad_bias, torch.zeros_like(b))


def test_backward_row_loop(monkeypatch):
    # Few backward programs, so each one loops over several BLOCK_M row tiles and the last
    # one stops mid-tile: the path large M takes on a GPU, at interpreter size.
    monkeypatch.setattr(kernels, "_BWD_PROGRAMS", 2)
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(2, 100, 77, generator=g)
    _check(x, torch.randn(77, generator=g), "none", grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_grad_bias_deterministic(dtype):
    # 77 x 1537: 10 row blocks x 7 column blocks of partial sums.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(77, 1537, generator=g).to(dtype)
    b = torch.randn(1537, generator=g).to(dtype)
    grad = torch.randn(77, 1537, generator=g).to(dtype)
    first = _triton_run(x, b, "tanh", grad)
    second = _triton_run(x, b, "tanh", grad)
    assert torch.equal(first[2], second[2])
    assert torch.equal(first[1], second[1])
