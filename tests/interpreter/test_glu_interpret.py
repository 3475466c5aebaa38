"""fasttx.glu on the triton backend, run by the Triton interpreter on CPU.

Checked against float64 PyTorch with tests/tolerance.py's rule: the kernel may
be off by at most a few times PyTorch's own error in the same dtype.
"""
import pytest
import torch

import fasttx
from fasttx.kernels import glu as kernels
from fasttx.ops.glu import ACTIVATIONS, glu_ref
from tolerance import DEFAULT_ATOL, assert_within_torch_error

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One element, a partial block, and several blocks with a tail (2 x 2051 = 4102 > 2 x 2048).
SHAPES = [(1,), (7, 77), (2, 2051)]


def _run(fn, gate, up, grad, dtype):
    gate = gate.detach().to(dtype).requires_grad_()
    up = up.detach().to(dtype).requires_grad_()
    y = fn(gate, up)
    y.backward(grad.to(dtype))
    return y.detach(), gate.grad, up.grad


def _atol(truth, dtype):
    # bfloat16: the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest), so its
    # results can be a full ulp off where torch's are at most half an ulp off.
    atol = DEFAULT_ATOL[dtype]
    if dtype == torch.bfloat16 and truth.numel() and truth.abs().max() > 0:
        atol += torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(truth.abs().max())).item()
    return atol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, activation, shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate = 4 * torch.randn(shape, generator=g)
    gate.view(-1)[:3] = torch.tensor([-40.0, 0.0, 40.0])[: gate.numel()]  # saturation both ways, and 0
    up = torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g)
    ref = lambda a, b: glu_ref(a, b, activation)
    with fasttx.use_backend("triton"):
        out = _run(lambda a, b: fasttx.glu(a, b, activation), gate, up, grad, dtype)
    truth = _run(ref, gate, up, grad, torch.float64)
    torch_out = _run(ref, gate, up, grad, dtype)
    for name, o, t, p, factor in zip(("y", "grad_gate", "grad_up"), out, truth, torch_out, (2, 3, 3)):
        assert_within_torch_error(o, t, p, factor=factor, atol=_atol(t, dtype), what=f"{dtype} {activation} {name}")


def test_empty_and_the_one_config():
    e = torch.empty(0, 5)
    assert kernels.glu_forward(e, e, "silu").shape == (0, 5)
    assert all(t.shape == (0, 5) for t in kernels.glu_backward(e, e, e, "gelu"))
    assert kernels.CONFIGS == (kernels.CONFIG,)
