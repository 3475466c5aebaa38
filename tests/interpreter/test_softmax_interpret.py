"""fasttx.kernels.softmax's host functions, run by the Triton interpreter on CPU.

Checked against float64 PyTorch with tests/tolerance.py's rule: the kernels may be off by at
most 2x PyTorch's own error in the same dtype (3x for the gradient), plus atol.
"""
import pytest
import torch

from fasttx.kernels import softmax as kernels
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _torch_softmax(x, scale, mask, is_causal, dtype):
    """softmax(scale * x + mask) in ``dtype``, fully masked rows -> 0."""
    s = scale * x.to(dtype)
    if mask is not None:
        s = s + mask.to(dtype)
    if is_causal:
        Tq, Tk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(1), float("-inf"))
    live = torch.isfinite(s).any(-1, keepdim=True)
    return torch.softmax(torch.where(live, s, 0.0), -1) * live


def _make_mask(kind, B, H, Tq, Tk, g):
    if kind is None:
        return None
    if kind == "keypad":  # (B, 1, 1, Tk) expanded: strides (Tk, 0, 0, 1)
        lengths = torch.randint(1, Tk + 1, (B,), generator=g)
        pad = torch.where(torch.arange(Tk)[None, :] < lengths[:, None], 0.0, float("-inf"))
        return pad.view(B, 1, 1, Tk).expand(B, H, Tq, Tk)
    if kind == "2d":  # (Tq, Tk) expanded: strides (0, 0, Tk, 1)
        m = torch.randn(Tq, Tk, generator=g)
        return m.masked_fill(torch.rand(Tq, Tk, generator=g) < 0.2, float("-inf")).expand(B, H, Tq, Tk)
    if kind == "fullrow":  # per head, one fully masked row
        m = torch.randn(B, H, Tq, Tk, generator=g)
        m[:, :, Tq // 2, :] = float("-inf")
        return m
    raise ValueError(kind)


def _atol(truth, dtype):
    """tolerance.py's atol, plus for bfloat16 one ulp of the largest |truth|: the interpreter casts
    fp32 -> bf16 by truncation (a GPU rounds to nearest)."""
    atol = DEFAULT_ATOL[dtype]
    if dtype == torch.bfloat16 and truth.numel() and truth.abs().max() > 0:
        atol += torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(truth.abs().max())).item()
    return atol


def _run_case(shape, dtype, is_causal, mask_kind, scale=0.37):
    g = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    grad_y = torch.randn(*shape, generator=g).to(dtype)
    mask = _make_mask(mask_kind, *shape, g)

    y = kernels.softmax_forward(x, scale, mask, is_causal)
    truth = _torch_softmax(x, scale, mask, is_causal, torch.float64)
    own = _torch_softmax(x, scale, mask, is_causal, dtype)
    assert not y.isnan().any()
    assert_within_torch_error(y, truth, own, factor=2.0, atol=_atol(truth, dtype), what="y")

    # The backward from the kernel's y (its input), truth in float64 from the same rounded inputs.
    dx = kernels.softmax_backward(grad_y, y, scale)
    y64, gy64 = y.double(), grad_y.double()
    dx_truth = scale * y64 * (gy64 - (gy64 * y64).sum(-1, keepdim=True))
    dx_own = torch._softmax_backward_data(grad_y, y, -1, dtype) * scale
    assert_within_torch_error(dx, dx_truth, dx_own, factor=3.0, atol=_atol(dx_truth, dtype), what="grad_x")
    return y, dx


CASES = [
    ((2, 3, 7, 7), "fp32", False, None),
    ((1, 2, 1, 77), "fp32", True, "keypad"),     # Tq = 1
    ((1, 2, 77, 7), "fp32", True, "2d"),         # Tq > Tk, causal
    ((1, 2, 7, 77), "fp16", True, "2d"),         # Tq < Tk, causal
    ((2, 2, 7, 77), "bf16", False, "keypad"),
    ((1, 1, 1, 1), "fp32", True, None),
    ((1, 2, 7, 16), "fp32", False, "fullrow"),   # a fully masked row -> 0
    ((1, 2, 7, 20), "fp16", True, "fullrow"),
    ((1, 2, 5, 1000), "bf16", False, "2d"),      # one row per program (BLOCK_M = 4)
    ((1, 1, 2, 9000), "fp32", True, "2d"),       # past _MAX_TILE_N: the looped path
]


@pytest.mark.parametrize("shape, dtype, is_causal, mask_kind", CASES,
                         ids=["x".join(map(str, c[0])) + f"-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_softmax_matches_reference(shape, dtype, is_causal, mask_kind):
    y, dx = _run_case(shape, DTYPES[dtype], is_causal, mask_kind)
    if mask_kind == "fullrow":
        row = shape[2] // 2
        assert (y[:, :, row] == 0).all() and (dx[:, :, row] == 0).all()


@pytest.mark.parametrize("shape, is_causal, mask_kind", [((1, 2, 7, 77), True, "keypad"), ((1, 2, 5, 40), False, "fullrow"),
                                                         ((1, 1, 3, 50), True, "2d")])
def test_softmax_looped_path(monkeypatch, shape, is_causal, mask_kind):
    # 16-wide chunks, so that short rows take several: the running max/sum rescaling and the tail.
    monkeypatch.setattr(kernels, "_config", lambda Tk: dict(BLOCK_M=1, BLOCK_N=16, num_warps=4, LOOPED=True))
    _run_case(shape, torch.float32, is_causal, mask_kind)


def test_softmax_config_is_listed():
    # tests/test_triton_aot.py compiles CONFIGS; the dispatcher must never return anything else.
    for Tk in list(range(1, 9000)) + [16384, 1 << 20]:
        assert kernels._config(Tk) in kernels.CONFIGS, Tk
