"""fasttx.layer_norm / add_layer_norm / rms_norm / add_rms_norm on the triton backend, run by the Triton
interpreter on CPU.

Checked through the public API against float64 PyTorch with tests/tolerance.py's rule: the
kernel may be off by at most a few times PyTorch's own error in the same dtype.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.kernels import layer_norm as kernels
from norm_cases import RMS_EPS, fasttx_fn, run, torch_fn  # noqa: F401
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPS = ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm")
LOOPED_N = 10000  # > kernels._MAX_TILE_N: three 4096-wide chunks, the last one partial
# One-lane rows, odd widths, several rows per tile (N <= 1024), one row per tile, and the looped path.
SHAPES = [lead + (n,) for lead in ((1,), (3, 5)) for n in (1, 7, 77, 1000, 1537)] + [(3, LOOPED_N)]


def test_looped_threshold():
    assert not kernels._config(3, kernels._MAX_TILE_N)["LOOPED"]
    assert kernels._config(3, LOOPED_N)["LOOPED"] and kernels._config(3, 65536)["LOOPED"]


_fasttx, _torch, _run = fasttx_fn, torch_fn, run


def _triton_run(op, inputs, grads):
    with fasttx.use_backend("triton"):
        return _run(_fasttx(op), inputs, grads)


def _ulp(truth, dtype):
    """One ulp of ``dtype`` at the largest |truth|."""
    if not truth.numel() or truth.abs().max() == 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(truth.abs().max())).item()


def _xhat64(op, x, r):
    """The normalized rows in float64: the terms of grad_weight's column sums."""
    s = x.double() + r.double() if r is not None else x.double()
    if "rms" in op:
        return s * torch.rsqrt(s.square().mean(-1, keepdim=True) + RMS_EPS)
    return F.layer_norm(s, s.shape[-1:])


def _atol(truth, dtype, what, column_terms=None):
    """tolerance.py's atol plus two allowances torch's own error does not bound.

    bfloat16: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), so
    its results can be a full ulp off where torch's are at most half an ulp off.
    grad_weight / grad_bias: the kernel sums the rows' fp32 terms in another order than torch,
    and a sum's rounding error scales with sum |terms|, not with |sum|.
    """
    atol = DEFAULT_ATOL[dtype]
    if dtype == torch.bfloat16:
        atol += _ulp(truth, dtype)
    if column_terms is not None:
        atol += torch.finfo(torch.float32).eps * column_terms.abs().reshape(-1, truth.shape[0]).sum(0).max().item()
    return atol


def _check(op, x, affine=True, seed=0):
    """The triton backend against fp64 truth, bounded by torch's own error in x's dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype, n = x.dtype, x.shape[-1]
    r = torch.randn(x.shape, generator=g).to(dtype) if op.startswith("add_") else None
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype) if affine else None
    b = (0.5 * torch.randn(n, generator=g)).to(dtype) if affine and "rms" not in op else None
    grads = [torch.randn(x.shape, generator=g).to(dtype) for _ in range(2)]
    inputs = [x, r, w, b]
    outs, in_grads = _triton_run(op, inputs, grads)
    truth_outs, truth_grads = _run(_torch(op), inputs, grads, cast=torch.float64)
    torch_outs, torch_grads = _run(_torch(op), inputs, grads)
    for i, (o, t, p) in enumerate(zip(outs, truth_outs, torch_outs)):
        assert_within_torch_error(o, t, p, factor=2.0, atol=_atol(t, dtype, "y"), what=f"{op} {dtype} output {i}")
    gy = grads[0].double()
    column_terms = {"weight": gy * _xhat64(op, x, r), "bias": gy}
    for name, o, t, p in zip(("x", "residual", "weight", "bias"), in_grads, truth_grads, torch_grads):
        if t is None:
            assert o is None, name
            continue
        assert_within_torch_error(o, t, p, factor=3.0, atol=_atol(t, dtype, name, column_terms.get(name)),
                                  what=f"{op} {dtype} grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", (True, False), ids=("affine", "no_affine"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward(shape, affine, op, dtype):
    seed = zlib.crc32(repr((shape, affine, op, dtype)).encode())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    _check(op, x, affine, seed)


@pytest.mark.parametrize("n", (1000, LOOPED_N))
@pytest.mark.parametrize("op", OPS)
def test_large_mean(op, n):
    # |mean| >> std: E[x^2] - E[x]^2 in fp32 would lose most digits of the variance.
    x = 1000 + torch.randn(4, n, generator=torch.Generator().manual_seed(n))
    _check(op, x, seed=n)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_widest_rows(op, dtype):
    # 65536 columns: sixteen chunks per pass of the looped path.
    x = torch.randn(2, 65536, generator=torch.Generator().manual_seed(5)).to(dtype)
    _check(op, x, seed=5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_looped_path_on_a_narrow_row(monkeypatch, op, dtype):
    # The looped path with a 256-wide chunk on 1000 columns: four chunks, the last partial,
    # and two backward programs of several rows each (the second stops short).
    monkeypatch.setattr(kernels, "_MAX_TILE_N", 64)
    monkeypatch.setattr(kernels, "_LOOPED_CONFIG", dict(kernels._LOOPED_CONFIG, BLOCK_N=256, num_warps=4))
    monkeypatch.setattr(kernels, "_BWD_PROGRAMS", 2)
    x = torch.randn(7, 1000, generator=torch.Generator().manual_seed(4)).to(dtype)
    _check(op, x, seed=4)


@pytest.mark.parametrize("op", OPS)
def test_backward_row_loop(monkeypatch, op):
    # Few backward programs, so each one loops over several BLOCK_M row tiles and the last one
    # stops mid-tile: the path large M takes on a GPU, at interpreter size (N = 77: 8 rows per tile).
    monkeypatch.setattr(kernels, "_BWD_PROGRAMS", 2)
    x = torch.randn(2, 100, 77, generator=torch.Generator().manual_seed(2))
    _check(op, x, seed=2)


@pytest.mark.parametrize("shape", ((20, 1537), (5, LOOPED_N)), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_backward_deterministic(monkeypatch, shape, op, dtype):
    monkeypatch.setattr(kernels, "_BWD_PROGRAMS", 2)  # several rows summed into each partial row
    g = torch.Generator().manual_seed(3)
    x, r, gy, gs = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    w, b = (torch.randn(shape[-1], generator=g).to(dtype) for _ in range(2))
    inputs = [x, r if op.startswith("add_") else None, w, b if "rms" not in op else None]
    first = _triton_run(op, inputs, [gy, gs])
    second = _triton_run(op, inputs, [gy, gs])
    for a, c in zip(first[0] + first[1], second[0] + second[1]):
        assert (a is None and c is None) or torch.equal(a, c)


def test_kernel_contract_outputs():
    # norm_forward's optional outputs: s only with a residual, mean only without rms.
    x = torch.randn(3, 20)
    y, s, mean, rstd = kernels.norm_forward(x, None, None, None, 1e-5, True)
    assert s is None and mean is None and rstd.dtype == torch.float32 and rstd.shape == (3,)
    y, s, mean, rstd = kernels.norm_forward(x, torch.randn(3, 20), None, None, 1e-5, False)
    assert s.shape == x.shape and mean.dtype == torch.float32 and mean.shape == (3,)
    grad_input, grad_weight, grad_bias = kernels.norm_backward(torch.randn(3, 20), None, x, mean, rstd,
                                                               None, False, False)
    assert grad_input.shape == x.shape and grad_weight is None and grad_bias is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm_output_is_layer_norm_of_its_sum(dtype):
    # What fasttx.nn.TransformerBlock's recomputation of add_layer_norm's output relies on.
    torch.manual_seed(0)
    x, r = (torch.randn(3, 1537, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(1537, dtype=dtype) for _ in range(2))
    with fasttx.use_backend("triton"):
        normed, total = fasttx.add_layer_norm(x, r, 1537, w, b)
        assert torch.equal(normed, fasttx.layer_norm(total, 1537, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_output_is_rms_norm_of_its_sum(dtype):
    # The same for the RMS pair (a LLaMA decoder layer's residual add and next norm), default eps included.
    torch.manual_seed(0)
    x, r = (torch.randn(3, 1537, dtype=dtype) for _ in range(2))
    w = torch.randn(1537, dtype=dtype)
    with fasttx.use_backend("triton"):
        normed, total = fasttx.add_rms_norm(x, r, 1537, w)
        assert torch.equal(normed, fasttx.rms_norm(total, 1537, w))
