"""fasttx.kernels.cross_entropy's host functions, run by the Triton interpreter on CPU.

Checked against the op's contract, fasttx/ops/cross_entropy.py's _torch_forward / _torch_backward:
the truth is that reference on float64 logits, and the kernels may be off by at most 2x (3x for
the gradient) the reference's own error in the kernels' output dtype, plus a few ulps of the
largest value (see _atol).
"""
import math

import pytest
import torch

from fasttx.kernels import cross_entropy as kernels
from fasttx.ops.cross_entropy import _torch_backward, _torch_forward
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = [(1, 1), (7, 7), (5, 1537), (3, 5000)]


def _atol(truth, dtype, ulps):
    """tolerance.py's atol plus ``ulps`` ulps (in ``dtype``) of the largest |truth|: a loss of ~log(V)
    carries an fp32 rounding of its own that the reference may happen not to make, and the
    interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest)."""
    big = truth.abs().max().item() if truth.numel() else 0.0
    return DEFAULT_ATOL[dtype] + (ulps * torch.finfo(dtype).eps * big)


def _check(logits, target, ignore_index=-100, seed=0):
    """Runs both kernels on (logits, target) and checks them against the contract; returns the outputs."""
    g = torch.Generator().manual_seed(seed)
    grad_rows = torch.rand(logits.shape[0], generator=g) + 0.5

    out = kernels.cross_entropy_forward(logits, target, ignore_index)
    assert all(o.dtype == torch.float32 and o.shape == logits.shape[:1] for o in out)
    truth = _torch_forward(logits.double(), target, ignore_index)
    own = _torch_forward(logits, target, ignore_index)
    for name, o, t, p in zip(("loss", "row_max", "log_sum"), out, truth, own):
        assert_within_torch_error(o, t, p, factor=2.0, atol=_atol(t, torch.float32, 4), what=name)
    loss, row_max, log_sum = out

    # The backward from the kernel's row statistics (its input); the truth from the float64 ones.
    grad = kernels.cross_entropy_backward(grad_rows, logits, target, row_max, log_sum, ignore_index)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    grad_truth = _torch_backward(grad_rows.double(), logits.double(), target, *truth[1:], ignore_index)
    grad_own = _torch_backward(grad_rows, logits, target, *own[1:], ignore_index)
    ulps = 1 if logits.dtype == torch.bfloat16 else 0
    assert_within_torch_error(grad, grad_truth, grad_own, factor=3.0, atol=_atol(grad_truth, logits.dtype, ulps),
                              what="grad_logits")
    ignored = target == ignore_index
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    return loss, grad


def _inputs(shape, dtype, seed=0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(shape, generator=g)).to(dtype)
    target = torch.randint(0, shape[1], shape[:1], generator=g)
    target[1::3] = ignore_index  # ignored rows; row 0 always counts
    return logits, target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    _check(*_inputs(shape, DTYPES[dtype], seed=sum(shape)))


@pytest.mark.parametrize("cfg", kernels.CONFIGS, ids=lambda c: f"BLOCK{c['BLOCK']}-w{c['num_warps']}")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_config(monkeypatch, cfg, dtype):
    # Each config on a row that takes several of its chunks and ends in a partial one.
    monkeypatch.setattr(kernels, "_config", lambda V: cfg)
    _check(*_inputs((3, 2 * cfg["BLOCK"] + 77), DTYPES[dtype], seed=cfg["BLOCK"]))


def test_natural_configs_cover_configs():
    # The shapes above reach every config through the dispatcher itself.
    assert {kernels.CONFIGS.index(kernels._config(V)) for _, V in SHAPES} == set(range(len(kernels.CONFIGS)))


def test_online_rescaling(monkeypatch):
    # 16-column chunks on rows whose max grows chunk after chunk, sits in the first chunk, or
    # sits after a run of -inf (masked vocabulary entries): every branch of the running max/sum.
    monkeypatch.setattr(kernels, "_config", lambda V: dict(BLOCK=16, num_warps=1))
    V = 77
    cols = torch.arange(V, dtype=torch.float32)
    logits = torch.stack([cols * 0.5, 40.0 - cols, torch.randn(V, generator=torch.Generator().manual_seed(1)),
                          torch.where(cols < 40, float("-inf"), cols / 7), torch.full((V,), 3.25)])
    target = torch.tensor([76, 0, 13, 50, 5])
    _check(logits, target)


def test_extreme_logits_and_ignore_index_in_range():
    logits = torch.tensor([[1e4, 0.0, -1e4], [-30.0, 50.0, 80.0], [0.0, 0.0, 0.0], [-1e4, 1e4, 1e4]])
    target = torch.tensor([1, 2, 2, 0])
    loss, _ = _check(logits, target, ignore_index=2)
    assert loss[1] == 0 and loss[2] == 0


def test_gpt2_vocabulary_row():
    # One program walks 13 chunks of 4096 of a 50257-column row (odd: no 16-byte alignment).
    logits, target = _inputs((2, 50257), torch.float32, seed=3)
    target[1] = 50256
    _check(logits, target)


def test_bad_target_poisons_its_row_and_reads_nothing():
    # The Python layer rejects such targets; under torch.compile it does not look, and then the
    # kernel must not read outside the row: the row's loss and gradient are NaN, the others exact.
    logits, _ = _inputs((3, 11), torch.float32)
    target = torch.tensor([11, 4, -7])
    loss, row_max, log_sum = kernels.cross_entropy_forward(logits, target, -100)
    assert torch.isnan(loss[0]) and torch.isnan(loss[2]) and not torch.isnan(loss[1])
    torch.testing.assert_close(row_max + log_sum, torch.logsumexp(logits, -1))
    grad = kernels.cross_entropy_backward(torch.ones(3), logits, target, row_max, log_sum, -100)
    assert torch.isnan(grad[0]).all() and torch.isnan(grad[2]).all() and torch.isfinite(grad[1]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_ignored_row_holding_a_non_finite_logit_is_torchs(bad):
    # torch's log_softmax backward gives an ignored row 0 * exp(NaN) = NaN where it holds NaN or +inf.
    logits, _ = _inputs((3, 11), torch.float32)
    logits[:, 5] = bad
    target = torch.tensor([-100, 4, -100])
    logits[2, 5] = 0.0  # a finite ignored row stays 0
    x = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(x, target, reduction="sum").backward()
    loss, row_max, log_sum = kernels.cross_entropy_forward(logits, target, -100)
    grad = kernels.cross_entropy_backward(torch.ones(3), logits, target, row_max, log_sum, -100)
    assert torch.equal(grad.isnan(), x.grad.isnan()) and torch.equal(grad.isinf(), x.grad.isinf())
    assert (grad[2] == 0).all()


def test_no_rows():
    logits = torch.empty(0, 5)
    target = torch.empty(0, dtype=torch.long)
    loss, row_max, log_sum = kernels.cross_entropy_forward(logits, target, -100)
    assert loss.shape == row_max.shape == log_sum.shape == (0,)
    assert kernels.cross_entropy_backward(loss, logits, target, row_max, log_sum, -100).shape == (0, 5)


@pytest.mark.parametrize("V", [1, 7, 1000, 50257])
def test_config_is_listed(V):
    # tests/test_triton_aot_cross_entropy.py compiles CONFIGS; the dispatcher must never return anything else.
    assert kernels._config(V) in kernels.CONFIGS


def test_config_is_listed_for_every_vocabulary():
    for V in list(range(1, 5000)) + [32000, 50257, 128256, 1 << 20, (1 << 31) - 1]:
        assert kernels._config(V) in kernels.CONFIGS, V


def test_rejects_what_the_contract_excludes():
    x = torch.randn(2, 3)
    t = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="float64"):
        kernels.cross_entropy_forward(x.double(), t, -100)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.cross_entropy_forward(torch.randn(3, 2).t(), t, -100)
    with pytest.raises(ValueError, match="int64"):
        kernels.cross_entropy_forward(x, t.int(), -100)
    with pytest.raises(ValueError, match="log_sum"):
        kernels.cross_entropy_backward(torch.ones(2), x, t, torch.ones(2), torch.ones(2, dtype=torch.float64), -100)


OFFSETS = (1e4, 1e6, 1e8, -1e8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS, ids=str)
@pytest.mark.parametrize("V", [1, 997, 5003], ids=lambda v: f"V{v}")
def test_large_shared_offset(offset, V, dtype):
    # Logits that share a large offset, one all-equal row and two of offset + randn: loss =
    # (max - x_t) + log_sum cancels the offset exactly, where lse - x_t rounded log(V) away
    # (1000 logits of 1e8 gave 8.0, not log 1000 = 6.9078).
    g = torch.Generator().manual_seed(V)
    spread = torch.randn(2, V, generator=g)
    logits = torch.cat([torch.zeros(1, V), spread]) + offset
    logits = logits.to(DTYPES[dtype])
    if not torch.isfinite(logits).all():
        pytest.skip(f"{offset} is past {dtype}'s range")
    target = torch.tensor([V // 2, 0, V - 1])
    loss, _ = _check(logits, target)
    torch.testing.assert_close(loss[0], torch.tensor(math.log(V)), rtol=1e-6, atol=1e-6)
