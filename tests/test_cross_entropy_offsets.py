"""cross_entropy on logits that share a large offset, on every backend, against float64.

The loss is (max - x_t) + log(sum exp(x - max)): the offset cancels in max - x_t exactly. The form
it replaces, lse - x_t with lse = max + log(sum ...) rounded to the logits' precision, lost the
sum's digits: 1000 equal fp32 logits of 1e8 gave 8.0 (an fp32 ulp at 1e8) for log 1000 = 6.9078,
and at 1e4 + randn the error was 700x torch's. The gradient, exp(x - max - log_sum) - onehot, takes
the same two numbers per row, never their rounded sum.
"""
import math

import pytest
import torch

import fasttx

from backend_params import device_backend_params, skip_unless_runnable
from test_cross_entropy import check_against_reference

BACKENDS = device_backend_params()
OFFSETS = [1e4, 1e6, 1e8, -1e8]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
VOCABS = [1, 2, 997, 1000, 50257]  # one class, two, a prime, the issue's 1000, GPT-2's odd vocabulary


def _logits(kind, rows, vocab, offset, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.zeros(rows, vocab) if kind == "equal" else torch.randn(rows, vocab, generator=g)
    return (spread.double() + offset).to(dtype).to(device)


def _skip_unless_supported(device, backend, dtype, x):
    skip_unless_runnable(device, backend)
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("the GPU kernels take float32 and narrower; float64 runs on the cpu and torch backends")
    if not torch.isfinite(x).all():
        pytest.skip(f"the offset is past {dtype}'s range")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", OFFSETS, ids=str)
@pytest.mark.parametrize("kind", ["randn", "equal"])
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
def test_shared_offset(device, backend, dtype, offset, kind, vocab):
    skip_unless_runnable(device, backend)  # before any tensor goes to device
    x = _logits(kind, 5, vocab, offset, dtype, device, seed=vocab)
    _skip_unless_supported(device, backend, dtype, x)
    target = torch.tensor([0, vocab - 1, vocab // 2, -100, vocab // 3], device=device)
    check_against_reference(backend, x, target, reduction="none")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_reductions_and_ignore_index_at_an_offset(device, backend, dtype, reduction, ignore_index):
    skip_unless_runnable(device, backend)  # before any tensor goes to device
    x = _logits("randn", 9, 101, 1e4, dtype, device, seed=ignore_index + 200)
    _skip_unless_supported(device, backend, dtype, x)
    target = torch.tensor([3, 7, -100, 100, 0, 3, 50, 3, 99], device=device)
    target[target == -100] = ignore_index
    check_against_reference(backend, x, target, reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e8, -1e8], ids=str)
def test_the_issues_example_1000_equal_logits(device, backend, offset):
    # Every class is equally likely: the loss is log 1000 whatever the offset, and the gradient
    # 1/1000 everywhere but the target's, 1/1000 - 1.
    skip_unless_runnable(device, backend)
    x = torch.full((4, 1000), offset, device=device, requires_grad=True)
    target = torch.tensor([0, 999, 500, 7], device=device)
    with fasttx.use_backend(backend):
        loss = fasttx.cross_entropy(x, target)
    loss.backward()
    assert abs(loss.item() - math.log(1000)) < 1e-5, loss.item()
    expect = torch.full_like(x, 1e-3).scatter_(1, target[:, None], 1e-3 - 1) / 4
    torch.testing.assert_close(x.grad, expect, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_offset_error_is_torchs(device, backend):
    # 1e4 + randn in fp32: the loss was 700x torch's error. Now it is torch's, within the usual factor.
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = (torch.randn(64, 3001, dtype=torch.float64) + 1e4).float().to(device)
    target = torch.randint(0, 3001, (64,), device=device)
    check_against_reference(backend, x, target, reduction="none")
