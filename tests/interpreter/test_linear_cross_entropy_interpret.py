"""fasttx.kernels.linear_cross_entropy's row kernel, and the op on the triton backend, run by the
Triton interpreter on CPU.

The row kernel is checked against its contract, fasttx/ops/linear_cross_entropy.py's _torch_rows:
the truth is that reference on float64 logits; the kernel may be off by at most 2x (3x for the
gradient) the reference's own error in the kernel's dtype, plus a few ulps of the largest value.
"""
import importlib

import pytest
import torch

import fasttx
from fasttx.kernels import linear_cross_entropy as kernels
from fasttx.ops.linear_cross_entropy import _torch_rows, linear_cross_entropy_ref
from tolerance import DEFAULT_ATOL, assert_within_torch_error

lce_module = importlib.import_module("fasttx.ops.linear_cross_entropy")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _atol(truth, dtype, ulps):
    big = truth.abs().max().item() if truth.numel() else 0.0
    return DEFAULT_ATOL[dtype] + ulps * torch.finfo(dtype).eps * big


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (3, 1537)], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(softcap=3.0), dict(label_smoothing=0.2, softcap=0.7)], ids=str)
def test_rows_match_the_contract(dtype, shape, options):
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(shape, generator=g)).to(dtype)
    target = torch.randint(0, shape[1], shape[:1], generator=g)
    target[1::3] = -100
    grad_rows = torch.rand(shape[0], generator=g) + 0.5
    eps, cap = options.get("label_smoothing", 0.0), options.get("softcap", 0.0)

    for with_grad in (False, True):
        x = logits.clone()
        loss, lse = kernels.linear_cross_entropy_rows(x, target, grad_rows if with_grad else None, -100, eps, cap)
        truth_x, own_x = logits.double(), logits.clone()
        truth = _torch_rows(truth_x, target, grad_rows.double() if with_grad else None, -100, eps, cap)
        own = _torch_rows(own_x, target, grad_rows if with_grad else None, -100, eps, cap)
        for name, o, t, p in zip(("loss", "lse"), (loss, lse), truth, own):
            assert_within_torch_error(o, t, p, factor=2.0, atol=_atol(t, torch.float32, 4), what=name)
        if with_grad:
            ulps = 1 if dtype == torch.bfloat16 else 0
            assert_within_torch_error(x, truth_x.to(torch.float64), own_x, factor=3.0,
                                      atol=_atol(truth_x, dtype, ulps), what="grad")
            assert (x[target == -100] == 0).all()
        else:
            assert torch.equal(x, logits)  # no gradient: the logits stay as they are
        assert (loss[target == -100] == 0).all()


def test_large_offset_cancels():
    logits = torch.tensor([[1e4, 1e4 + 1.0, 1e4 - 2.0]])
    target = torch.tensor([1])
    loss, lse = kernels.linear_cross_entropy_rows(logits.clone(), target, None, -100, 0.1, 0.0)
    truth, _ = _torch_rows(logits.double(), target, None, -100, 0.1, 0.0)
    assert abs(loss.item() - truth.item()) < 1e-6


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_on_the_triton_backend(reduction):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 5, generator=g, requires_grad=True)
    weight = torch.randn(13, 5, generator=g, requires_grad=True)
    bias = torch.randn(13, generator=g, requires_grad=True)
    target = torch.randint(0, 13, (9,), generator=g)
    target[2] = -100
    old, lce_module._CHUNK_ROWS = lce_module._CHUNK_ROWS, 4
    try:
        with fasttx.use_backend("triton"):
            loss = fasttx.linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                               label_smoothing=0.1, softcap=5.0)
            grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    finally:
        lce_module._CHUNK_ROWS = old
    want = linear_cross_entropy_ref(hidden, weight, target, bias, reduction=reduction, label_smoothing=0.1,
                                    softcap=5.0)
    want_grads = torch.autograd.grad(want.sum(), (hidden, weight, bias))
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
