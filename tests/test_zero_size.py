"""Zero-size inputs give PyTorch's answer, forward and backward, on every backend.

No rows, no features, no hidden units: each op's entry routes an input with nothing to compute
past the kernels (which never launch on it) and still returns torch's shapes, dtypes and values:
empty outputs, zero parameter gradients, NaN for the mean of no losses. gelu_ffn with d_model 0
used to end in "cannot reshape tensor of 0 elements into shape [-1, 0]".
"""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.linear import linear

from backend_params import device_backend_params, skip_unless_runnable

BACKENDS = device_backend_params()
DTYPES = [torch.float32, torch.bfloat16]


def _compare(backend, fn, ref, *tensors):
    """fn (fasttx, under backend) and ref (torch) on copies of tensors: outputs and every gradient equal."""
    def run(f):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None
                  for t in tensors]
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs).backward()
        return outs, [t.grad for t in leaves if t is not None and t.is_floating_point()]

    with fasttx.use_backend(backend):
        got, got_grads = run(fn)
    want, want_grads = run(ref)
    for g, w in zip(got + tuple(got_grads), want + tuple(want_grads)):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
            torch.testing.assert_close(g, w, equal_nan=True)


SHAPES = [(0, 8), (3, 0), (2, 0, 4), (0, 3, 0)]


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    return make(*shape), make(shape[-1]), make(shape[-1])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norms(device, backend, dtype, shape):
    skip_unless_runnable(device, backend)
    x, w, b = _inputs(shape, dtype, device)
    n = shape[-1]
    _compare(backend, lambda x, w, b: fasttx.layer_norm(x, n, w, b), lambda x, w, b: F.layer_norm(x, (n,), w, b),
             x, w, b)
    _compare(backend, lambda x, r, w, b: fasttx.add_layer_norm(x, r, n, w, b),
             lambda x, r, w, b: (F.layer_norm(x + r, (n,), w, b), x + r), x, x.clone(), w, b)
    _compare(backend, lambda x, w: fasttx.rms_norm(x, n, w), lambda x, w: F.rms_norm(x, (n,), w), x, w)
    _compare(backend, lambda x, r, w: fasttx.add_rms_norm(x, r, n, w),
             lambda x, r, w: (F.rms_norm(x + r, (n,), w), x + r), x, x.clone(), w)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(device, backend, dtype, shape, approximate):
    skip_unless_runnable(device, backend)
    x, _, b = _inputs(shape, dtype, device)
    _compare(backend, lambda x, b: fasttx.bias_gelu(x, b, approximate),
             lambda x, b: F.gelu(x + b, approximate=approximate), x, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0), (0, 0)], ids=str)
def test_softmax(device, backend, dtype, shape):
    skip_unless_runnable(device, backend)
    x = torch.randn(shape).to(device, dtype)
    _compare(backend, lambda x: fasttx.softmax(x, scale=0.5), lambda x: torch.softmax(0.5 * x, -1), x)
    mask = torch.ones(shape[-2:], dtype=torch.bool, device=device)
    _compare(backend, lambda x: fasttx.softmax(x, attn_mask=mask), lambda x: torch.softmax(x, -1), x)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_no_rows(device, backend, dtype, reduction):
    # torch's mean over no targets is 0/0 = NaN; sum is 0; none is empty
    skip_unless_runnable(device, backend)
    x = torch.randn(0, 7).to(device, dtype)
    t = torch.zeros(0, dtype=torch.long, device=device)
    _compare(backend, lambda x: fasttx.cross_entropy(x, t, reduction=reduction),
             lambda x: F.cross_entropy(x, t, reduction=reduction), x)


# (rows, d_model, d_hidden, d_out): each of them 0 in turn, and all at once
FFN_SIZES = [(0, 8, 16, 8), (4, 0, 16, 8), (4, 8, 0, 8), (4, 8, 16, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", FFN_SIZES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_gelu_ffn(device, backend, dtype, sizes, activation):
    skip_unless_runnable(device, backend)
    n, d, h, o = sizes
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    act = F.relu if activation == "relu" else F.gelu
    _compare(backend, lambda x, w1, b1, w2, b2: fasttx.gelu_ffn(x, w1, b1, w2, b2, activation),
             lambda x, w1, b1, w2, b2: F.linear(act(F.linear(x, w1, b1)), w2, b2),
             make(2, n, d), make(h, d), make(h), make(o, h), make(o))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(0, 8, 16), (4, 0, 16), (4, 8, 0), (0, 0, 0)], ids=str)
def test_linear(device, backend, sizes):
    skip_unless_runnable(device, backend)
    n, d, o = sizes
    make = lambda *s: torch.randn(*s, device=device)
    _compare(backend, linear, F.linear, make(n, d), make(o, d), make(o))
