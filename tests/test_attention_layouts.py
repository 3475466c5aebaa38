"""scaled_dot_product_attention on every memory layout a caller can hand over, and on zero sizes.

Layouts: rows that overlap (a key expanded along the sequence, stride 0; as_strided windows, row stride
below the head dim), batch and head broadcasts (stride 0), transposed and strided views, for q, k, v, the
mask and the output gradient, forward and backward. The CPU kernel hands row strides to its GEMMs as
leading dimensions, which BLAS refuses below the head dim: such inputs must be copied first, never give
uninitialised memory. Each result is checked against float64 PyTorch with FlashAttention's rule and must
be the same on a second call.

Zero sizes: 0 batch, 0 heads, 0 queries, 0 keys, head dim 0 (where torch gives the mean of v) must give
torch's answer forward and backward, and the GPU wrappers must return before launching anything.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fasttx

from backend_params import skip_unless_runnable
from tolerance import assert_within_torch_error

B, H, TQ, TK, D = 2, 3, 9, 11, 16
NAMES = ("out", "grad_q", "grad_k", "grad_v")


def _view(layout, shape, dtype, seed):
    """A (b, h, t, d) tensor in the given memory layout, its values drawn from randn(seed)."""
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = shape
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)
    if layout == "contiguous":
        return rand(b, h, t, d)
    if layout == "expanded_seq":  # one row repeated along the sequence: row stride 0
        return rand(b, h, 1, d).expand(b, h, t, d)
    if layout == "broadcast_batch":
        return rand(1, h, t, d).expand(b, h, t, d)
    if layout == "broadcast_head":
        return rand(b, 1, t, d).expand(b, h, t, d)
    if layout == "overlapping_rows":  # sliding windows d // 2 apart: each row shares half its values
        per_head = (t + 1) * d // 2
        return rand(b * h * per_head).as_strided((b, h, t, d), (h * per_head, per_head, d // 2, 1))
    if layout == "row_stride_1":  # windows one value apart
        per_head = t + d
        return rand(b * h * per_head).as_strided((b, h, t, d), (h * per_head, per_head, 1, 1))
    if layout == "transposed":  # (b, t, h, d) memory
        return rand(b, t, h, d).transpose(1, 2)
    if layout == "strided_head_dim":
        return rand(b, h, t, 2 * d)[..., ::2]
    raise ValueError(layout)


LAYOUTS = ["expanded_seq", "broadcast_batch", "broadcast_head", "overlapping_rows", "row_stride_1", "transposed",
           "strided_head_dim"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.fixture(params=["default", "block", "blas"])
def gemm_path(request):
    """The CPU GEMM paths (see tests/test_attention.py): the default choice, our block GEMMs, BLAS."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx import _C
    if request.param == "default":
        yield request.param
        return
    if request.param == "block" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the block GEMMs need AVX-512")
    previous = (_C.set_block_gemm_enabled(request.param == "block"), _C.set_bf16_brgemm_enabled(False))
    yield request.param
    _C.set_block_gemm_enabled(previous[0])
    _C.set_bf16_brgemm_enabled(previous[1])


def _once_for_fp64(gemm_path, dtype):
    if dtype == torch.float64 and gemm_path != "default":
        pytest.skip("fp64 always runs on BLAS: the default path covers it")


def _run(fn, q, k, v, grad, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad for t in leaves)


def _check(q, k, v, grad, mask=None, **kw):
    """fasttx (cpu backend) within FlashAttention's rule of float64 torch, and equal on a second call."""
    def torch_run(dt):  # on contiguous copies: torch's own CPU SDPA is wrong on overlapping rows (2.14)
        m = mask.to(dt) if mask is not None and mask.dtype != torch.bool else mask
        m = m.contiguous() if m is not None else None
        q_, k_, v_, g_ = (t.to(dt).contiguous() for t in (q, k, v, grad))
        return _run(F.scaled_dot_product_attention, q_, k_, v_, g_, attn_mask=m, **kw)

    with fasttx.use_backend("cpu"):
        first, second = (_run(fasttx.scaled_dot_product_attention, q, k, v, grad, attn_mask=mask, **kw)
                         for _ in range(2))
    truth, torch_out = torch_run(torch.float64), torch_run(q.dtype)
    for name, a, b, t, p in zip(NAMES, first, second, truth, torch_out):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert torch.equal(a, b), f"{name} differs between two calls"
        assert_within_torch_error(a, t, p, factor=2 if name == "out" else 3, what=f"{q.dtype} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["q", "k", "v", "grad_out"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_input_layouts(gemm_path, dtype, layout, which, is_causal):
    _once_for_fp64(gemm_path, dtype)
    shapes = {"q": (B, H, TQ, D), "k": (B, H, TK, D), "v": (B, H, TK, D), "grad_out": (B, H, TQ, D)}
    tensors = {name: _view(layout if name == which else "contiguous", shape, dtype, seed)
               for seed, (name, shape) in enumerate(shapes.items())}
    _check(tensors["q"], tensors["k"], tensors["v"], tensors["grad_out"], is_causal=is_causal)


def test_the_issues_example_key_expanded_along_the_sequence(gemm_path):
    """issue 24: k = randn(1, 2, 1, 16).expand(1, 2, 10, 16) handed MKL a row stride of 0 < 16."""
    torch.manual_seed(0)
    q, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    k = torch.randn(1, 2, 1, 16).expand(1, 2, 10, 16)
    _check(q, k, v, torch.randn(1, 2, 10, 16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_input_in_the_layout_at_once(gemm_path, dtype, layout):
    _once_for_fp64(gemm_path, dtype)
    q, k, v, grad = (_view(layout, (B, H, t, D), dtype, seed) for seed, t in enumerate((TQ, TK, TK, TQ)))
    _check(q, k, v, grad)


def _mask(layout, dtype):
    g = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)
    if layout == "expanded_rows":  # one row of key biases for every query: row stride 0
        return rand(B, H, 1, TK).expand(B, H, TQ, TK)
    if layout == "broadcast_batch_head":
        return rand(1, 1, TQ, TK).expand(B, H, TQ, TK)
    if layout == "overlapping_rows":
        return rand(B * H * (TQ + TK)).as_strided((B, H, TQ, TK), (H * (TQ + TK), TQ + TK, 1, 1))
    if layout == "transposed":  # stride 1 along the queries, not the keys
        return rand(B, H, TK, TQ).transpose(-1, -2)
    if layout == "bool_expanded":
        m = torch.rand(1, 1, 1, TK, generator=g) > 0.3
        m[..., 0] = True
        return m.expand(B, H, TQ, TK)
    raise ValueError(layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["expanded_rows", "broadcast_batch_head", "overlapping_rows", "transposed",
                                    "bool_expanded"])
def test_mask_layouts(gemm_path, dtype, layout):
    _once_for_fp64(gemm_path, dtype)
    q, k, v, grad = (_view("contiguous", (B, H, t, D), dtype, seed) for seed, t in enumerate((TQ, TK, TK, TQ)))
    _check(q, k, v, grad, mask=_mask(layout, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_single_query_row_with_a_small_row_stride(gemm_path, dtype):
    _once_for_fp64(gemm_path, dtype)
    """One query row whose stride is below the head dim (decoding one token from a sliced buffer)."""
    q = torch.randn(B * H * D + 1).to(dtype).as_strided((B, H, 1, D), (H * D, D, 1, 1))
    k, v = (_view("contiguous", (B, H, TK, D), dtype, seed) for seed in (1, 2))
    grad = torch.randn(B, H * D).to(dtype).as_strided((B, H, 1, D), (H * D, D, 0, 1))
    _check(q, k, v, grad)


# ---- zero sizes --------------------------------------------------------------------------

# (q shape, k shape, v shape, enable_gqa)
EMPTY = [((0, 3, 4, 8), (0, 3, 5, 8), (0, 3, 5, 8), False),  # no batch
         ((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), False),  # no heads
         ((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 8), True),
         ((2, 3, 0, 8), (2, 3, 5, 8), (2, 3, 5, 8), False),  # no queries
         ((2, 3, 4, 8), (2, 3, 0, 8), (2, 3, 0, 8), False),  # no keys: zeros
         ((2, 4, 4, 8), (2, 2, 0, 8), (2, 2, 0, 8), True),
         ((2, 3, 0, 8), (2, 3, 0, 8), (2, 3, 0, 8), False),
         ((2, 3, 4, 0), (2, 3, 5, 0), (2, 3, 5, 0), False),  # head dim 0
         ((2, 3, 4, 0), (2, 3, 5, 0), (2, 3, 5, 6), False),  # head dim 0, value dim 6: the mean of v
         ((2, 4, 4, 0), (2, 2, 5, 0), (2, 2, 5, 6), True),
         ((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 0), False)]  # value dim 0


@pytest.mark.parametrize("backend", ["cpu", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
@pytest.mark.parametrize("qs,ks,vs,gqa", EMPTY, ids=str)
def test_zero_sizes_match_torch(backend, dtype, mask, qs, ks, vs, gqa):
    if backend != "auto":
        skip_unless_runnable("cpu", backend)
    torch.manual_seed(0)
    q, k, v = torch.randn(qs).to(dtype), torch.randn(ks).to(dtype), torch.randn(vs).to(dtype)
    grad = torch.randn(*qs[:-1], vs[-1]).to(dtype)
    kw = dict(enable_gqa=gqa, is_causal=mask == "causal")
    if mask in ("bool", "float"):
        m = torch.rand(qs[-2], ks[-2]) > 0.3
        kw["attn_mask"] = m if mask == "bool" else torch.randn(qs[-2], ks[-2]).to(dtype)
    with fasttx.use_backend(backend) if backend != "auto" else contextlib.nullcontext():
        ours = _run(fasttx.scaled_dot_product_attention, q, k, v, grad, **kw)
    theirs = _run(F.scaled_dot_product_attention, q, k, v, grad, **kw)
    for name, a, b in zip(NAMES, ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype}, torch {b.shape} {b.dtype}"
        torch.testing.assert_close(a, b, msg=f"{name} differs from torch's")


def test_gpu_wrappers_return_before_launching():
    """The Triton host functions give the contract's answer for empty problems without a launch (these are
    CPU tensors: a launch would fail)."""
    pytest.importorskip("triton")
    from fasttx.kernels import attention as kernels
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 0, 16)
    out, lse = kernels.attention_forward(q, k, k, None, False, 0.25, 0.0, 0, 0)
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(lse, torch.full((2, 3, 4), float("inf")))
    grads = kernels.attention_backward(torch.randn_like(q), q, k, k, out, lse, None, False, 0.25, 0.0, 0, 0)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape] and not any(g.any() for g in grads)
    empty = torch.randn(0, 3, 4, 16)
    out, lse = kernels.attention_forward(empty, empty, empty, None, False, 0.25, 0.0, 0, 0)
    assert out.shape == empty.shape and lse.shape == (0, 3, 4)
