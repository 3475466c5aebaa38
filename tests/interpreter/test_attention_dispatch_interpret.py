"""The Triton attention and softmax reached through the public API, under the interpreter:
the same answers as the cpu and torch backends, and the same dropout for the same torch.manual_seed."""
import pytest
import torch

import fasttx
from fasttx import backends

from tolerance import assert_within_torch_error


def _backends_here():
    return [b for b in ("triton", "cpu", "torch") if backends.machine_reasons()[b] is None]


def _run(backend, q, k, v, grad, seed, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(seed)
    with fasttx.use_backend(backend):
        out = fasttx.scaled_dot_product_attention(*leaves, **kw)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad for t in leaves)


@pytest.mark.parametrize("kw", [dict(dropout_p=0.3), dict(dropout_p=0.5, is_causal=True, enable_gqa=True)],
                         ids=["full", "causal-gqa"])
def test_dropout_is_the_same_in_triton_cpu_and_torch(kw):
    here = _backends_here()
    assert "triton" in here, "the interpreter should make the triton backend available on CPU tensors"
    torch.manual_seed(0)
    q = torch.randn(2, 4, 13, 16)
    k, v = torch.randn(2, 2 if kw.get("enable_gqa") else 4, 21, 16), torch.randn(2, 2 if kw.get("enable_gqa") else 4, 21, 16)
    grad = torch.randn_like(q)
    results = {b: _run(b, q, k, v, grad, 1234, **kw) for b in here}
    for b, got in results.items():
        for name, o, t in zip(("out", "grad_q", "grad_k", "grad_v"), got, results["torch"]):
            torch.testing.assert_close(o, t, rtol=2e-5, atol=2e-5, msg=lambda m: f"{b} vs torch, {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_through_the_api_matches_the_reference(dtype):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 80), torch.randn(1, 2, 20, 80), torch.randn(1, 2, 20, 80)
    mask = torch.rand(9, 20) > 0.4
    mask[3] = False  # a query with nothing to attend to
    grad = torch.randn(1, 2, 9, 80)

    def run(backend, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        with fasttx.use_backend(backend):
            out = fasttx.scaled_dot_product_attention(*leaves, attn_mask=mask)
        out.backward(grad.to(dt))
        return (out.detach(),) + tuple(t.grad for t in leaves)

    got, truth, torch_out = run("triton", dtype), run("torch", torch.float64), run("torch", dtype)
    for name, o, t, p in zip(("out", "grad_q", "grad_k", "grad_v"), got, truth, torch_out):
        assert_within_torch_error(o, t, p, factor=2 if name == "out" else 3, what=f"triton {dtype} {name}")


def test_triton_softmax_through_the_api():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 33, requires_grad=True)
    grad = torch.randn_like(x)
    outs = []
    for backend in ("triton", "torch"):
        with fasttx.use_backend(backend):
            y = fasttx.softmax(x, 0.5, is_causal=True)
        (gx,) = torch.autograd.grad(y, x, grad)
        outs.append((y, gx))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
