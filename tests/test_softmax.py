"""softmax (fused scale + mask + softmax of attention scores) against PyTorch on every backend."""
import pytest
import torch

import fasttx
from fasttx.ops.softmax import softmax_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (1, 2, 77, 1000), (2, 1, 5, 1537), (3, 128, 128), (4, 9)]


def _run(fn, x, grad, **kw):
    x = x.detach().requires_grad_()
    y = fn(x, **kw)
    y.backward(grad)
    return y.detach(), x.grad


def check_against_reference(backend, x, **kw):
    grad = torch.randn_like(x)
    mask = kw.pop("attn_mask", None)
    run = lambda fn, dt: _run(fn, x.to(dt), grad.to(dt), attn_mask=(mask.to(dt) if mask is not None and
                                                                     mask.dtype != torch.bool else mask), **kw)
    with fasttx.use_backend(backend):
        got = run(fasttx.softmax, x.dtype)
    truth, torch_out = run(softmax_ref, torch.float64), run(softmax_ref, x.dtype)
    for name, o, t, p in zip(("y", "grad_x"), got, truth, torch_out):
        assert torch.isfinite(o).all(), f"{backend} {name} has non-finite values"
        assert_within_torch_error(o, t, p, factor=2 if name == "y" else 3, what=f"{backend} {x.dtype} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, is_causal, shape):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype) * 4
    check_against_reference(backend, x, scale=0.3, is_causal=is_causal)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("kind", ["key_padding", "bool_2d", "float_full", "fully_masked_row"])
def test_masks(device, backend, kind):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 77, device=device)
    if kind == "key_padding":
        mask = torch.ones(2, 1, 1, 77, dtype=torch.bool, device=device)
        mask[1, ..., 40:] = False
    elif kind == "bool_2d":
        mask = torch.rand(9, 77, device=device) > 0.5
    elif kind == "float_full":
        mask = torch.randn(2, 3, 9, 77, device=device)
    else:
        mask = torch.ones(9, 77, dtype=torch.bool, device=device)
        mask[4] = False
    check_against_reference(backend, x, scale=0.125, attn_mask=mask)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous_and_empty(device, backend):
    skip_unless_runnable(device, backend)
    x = torch.randn(2, 50, 3, 40, device=device).transpose(1, 2)
    check_against_reference(backend, x, scale=1.0)
    check_against_reference(backend, torch.randn(2, 0, 5, 5, device=device), scale=1.0)
    check_against_reference(backend, torch.randn(2, 1, 5, 0, device=device), scale=1.0)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    skip_unless_runnable(device, backend)
    x, grad = torch.randn(3, 4, 33, 1537, device=device), torch.randn(3, 4, 33, 1537, device=device)
    with fasttx.use_backend(backend):
        assert all(torch.equal(a, b) for a, b in zip(_run(fasttx.softmax, x, grad), _run(fasttx.softmax, x, grad)))


@pytest.mark.parametrize("kw,error,match", [
    (dict(x=torch.randn(5)), ValueError, "at least 2"),
    (dict(x=torch.randint(0, 3, (3, 3))), TypeError, "float"),
    (dict(x=torch.randn(3, 3), attn_mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, "broadcast"),
    (dict(x=torch.randn(3, 3), attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True), ValueError, "not both"),
    (dict(x=torch.randn(3, 3), attn_mask=torch.ones(3, 3, dtype=torch.float64)), TypeError, "dtype"),
])
def test_bad_input_names_the_argument(kw, error, match):
    with pytest.raises(error, match=match):
        fasttx.softmax(**kw)
