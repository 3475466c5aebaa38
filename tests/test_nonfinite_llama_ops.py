"""NaN and +-Inf through apply_rotary, glu, glu_ffn and linear_cross_entropy land where PyTorch's own formulas put them,
values and gradients (tests/test_nonfinite.py does the same for the older ops)."""
import pytest
import torch
import torch.nn.functional as F

import fasttx

BACKENDS = ("cpu", "torch")


def poisoned(*shape, dtype=torch.float32):
    t = torch.randn(*shape, dtype=torch.float64)
    flat = t.view(-1)
    flat[3], flat[flat.numel() // 2], flat[-2] = float("nan"), float("inf"), float("-inf")
    return t.to(dtype)


def both(fn_fasttx, fn_torch, inputs, backend):
    """Outputs and input gradients of fasttx (forced backend) and of the torch formula."""
    results = []
    for run in (fn_fasttx, fn_torch):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with fasttx.use_backend(backend):
            outs = run(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    return results


def assert_same_nonfinite(got, want, rtol=1e-4, atol=1e-5):
    assert any((~torch.isfinite(w)).any() for w in want), "the poisoned input reached no output: the test checks nothing"
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), "NaN in other places than torch's"
        assert torch.equal(torch.isposinf(g), torch.isposinf(w)) and torch.equal(torch.isneginf(g), torch.isneginf(w))
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite].double(), w[finite].double(), rtol=rtol, atol=atol)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rotary(backend):
    torch.manual_seed(0)
    q, k = poisoned(2, 3, 5, 8), poisoned(2, 1, 5, 8)
    angles = torch.arange(5.0)[:, None] * torch.rand(4)
    cos, sin = torch.cat((angles, angles), -1).cos()[None], torch.cat((angles, angles), -1).sin()[None]
    ref = lambda q, k: (q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None])
    got, want = both(lambda q, k: fasttx.apply_rotary(q, k, cos, sin), ref, (q, k), backend)
    assert_same_nonfinite(got, want)


@pytest.mark.parametrize("activation,torch_act", [("silu", F.silu), ("gelu", F.gelu),
                                                  ("gelu_tanh", lambda g: F.gelu(g, approximate="tanh"))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_glu(backend, activation, torch_act):
    torch.manual_seed(0)
    gate, up = poisoned(7, 33), poisoned(7, 33).flip(-1)
    got, want = both(lambda g, u: fasttx.glu(g, u, activation), lambda g, u: torch_act(g) * u, (gate, up), backend)
    assert_same_nonfinite(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_ffn(backend):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    w_gate, w_up, w_down = torch.randn(24, 16) * 0.2, torch.randn(24, 16) * 0.2, torch.randn(16, 24) * 0.2
    ref = lambda x, a, b, c: F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c)
    got, want = both(lambda x, a, b, c: fasttx.glu_ffn(x, a, b, c), ref, (x, w_gate, w_up, w_down), backend)
    assert_same_nonfinite(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy(backend, dtype):
    """A NaN in a token's hidden state makes its loss and its gradient rows NaN (and, through the sums over
    tokens, grad_weight and grad_bias); a -inf bias makes that class's logits -inf: its probability is 0,
    and a token whose target it is gets an infinite loss with a finite gradient, as in F.cross_entropy."""
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(6, 16), torch.randn(37, 16) * 0.3, torch.randn(37)
    hidden[1, 3], bias[5] = float("nan"), float("-inf")
    target = torch.tensor([0, 3, 5, 36, 5, 9])
    inputs = tuple(t.to(dtype) for t in (hidden, weight, bias))
    ref = lambda h, w, b: F.cross_entropy(F.linear(h, w, b), target, reduction="none")
    got, want = both(lambda h, w, b: fasttx.linear_cross_entropy(h, w, target, b, reduction="none"), ref, inputs,
                     backend)
    assert torch.isnan(want[0][1]) and torch.isposinf(want[0][2]) and torch.isfinite(want[0][[0, 3, 5]]).all()
    # the finite values to bf16's rounding there (the reference tests hold them to the 2x/3x rule)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    assert_same_nonfinite([g.float() for g in got], [w.float() for w in want], **tol)
