"""fasttx.kernels.apply_rotary's host functions, run by the Triton interpreter on CPU.

Checked against the op's contract, fasttx/ops/apply_rotary.py's _torch_forward / _torch_backward:
the truth is that reference in float64, and the kernel may be off by at most 2x (3x for the
gradients) the reference's own error in the kernel's dtype, plus one ulp of the largest value
for bfloat16 (the interpreter casts fp32 -> bf16 by truncation; a GPU rounds to nearest).
"""
import pytest
import torch

import fasttx
from fasttx.kernels import apply_rotary as kernels
from fasttx.ops.apply_rotary import _torch_backward, _torch_forward, apply_rotary_ref
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (B, Hq, Hk, T, D, Dr): a pair, odd sizes with GQA, partial rotary with a column tail, and
# Dr/2 = 136 > 128 pairs, two column steps.
SHAPES = [(1, 1, 1, 1, 2, 2), (2, 3, 1, 5, 12, 12), (1, 2, 1, 3, 80, 48), (1, 1, 1, 2, 280, 272)]


def _atol(truth, dtype):
    big = truth.abs().max().item() if truth.numel() else 0.0
    return DEFAULT_ATOL[dtype] + (torch.finfo(dtype).eps * big if dtype == torch.bfloat16 else 0.0)


def _check(q, k, cos, sin, position_ids, interleaved):
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    args = (cos, sin, position_ids, interleaved)
    wide = (cos.double(), sin.double(), position_ids, interleaved)
    results = [(kernels.apply_rotary_forward(q, k, *args), _torch_forward(q.double(), k.double(), *wide),
                _torch_forward(q, k, *args), 2.0),
               (kernels.apply_rotary_backward(gq, gk, *args), _torch_backward(gq.double(), gk.double(), *wide),
                _torch_backward(gq, gk, *args), 3.0)]
    for outs, truths, owns, factor in results:
        for o, x, t, p in zip(outs, (q, k), truths, owns):
            assert o.shape == x.shape and o.dtype == x.dtype and o.is_contiguous()
            assert_within_torch_error(o, t, p, factor=factor, atol=_atol(t, o.dtype))


def _tables(rows, dr, dtype):
    # Every element its own value (transformers' tables repeat theirs per pair): a kernel that
    # reads the partner's cos or sin in place of its own fails here.
    return torch.randn(rows, dr).to(dtype), torch.randn(rows, dr).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward_backward(shape, interleaved, dtype):
    torch.manual_seed(0)
    b, hq, hk, t, d, dr = shape
    q, k = torch.randn(b, hq, t, d, dtype=dtype), torch.randn(b, hk, t, d, dtype=dtype)
    cos, sin = _tables(t, dr, dtype)
    _check(q, k, cos.expand(b, t, dr), sin.expand(b, t, dr), None, interleaved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_position_ids_float32_tables_and_strided_views(dtype):
    torch.manual_seed(0)
    b, t, h, d = 2, 3, 2, 16
    qkv = torch.randn(b, t, 3, h, d, dtype=dtype)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1, :1].transpose(1, 2)
    cos, sin = _tables(11, 10, torch.float32)
    _check(q, k, cos, sin, torch.tensor([[10, 0, 4], [3, 3, 7]]), False)


def test_empty():
    q = torch.randn(2, 0, 3, 8)
    cos, sin = _tables(3, 8, torch.float32)
    out = kernels.apply_rotary_forward(q, q, cos.expand(2, 3, 8), sin.expand(2, 3, 8), None, False)
    assert [o.shape for o in out] == [q.shape] * 2


def test_every_config_is_listed():
    # tests/test_triton_aot_apply_rotary.py compiles CONFIGS; the dispatcher must return no other.
    for half in range(1, 600):
        assert kernels._config(half) in kernels.CONFIGS


def test_through_the_op():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = _tables(3, 8, torch.float32)
    with fasttx.use_backend("triton"):
        out = fasttx.apply_rotary(q, q, cos, sin)
        out[0].sum().backward()
    torch.testing.assert_close(out[0], apply_rotary_ref(q, q, cos, sin)[0])
    grad = _torch_backward(torch.ones_like(q), torch.ones_like(q), cos.expand(1, 3, 8), sin.expand(1, 3, 8), None,
                           False)[0]
    torch.testing.assert_close(q.grad, grad)
