"""Rung (e) for the GPU code paths that the per-op tests' shapes never reach.

A review of the never-run GPU code found branches that only large, misaligned or float64 inputs
take: the CUDA softmax past its register cache (over 2048 columns), the CUDA LayerNorm's row tail
(over 2048 packs of 16 bytes per row), Triton softmax's looped path (over 8192 columns), every
float64 CUDA instantiation, the fallbacks for a base pointer that is not 16-byte aligned, and
autocast and torch.compile on CUDA tensors. Each is checked here against the float64 truth with
tests/tolerance.py's rule. Skipped without a GPU, saying so.
"""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.bias_gelu import bias_gelu_ref
from fasttx.ops.softmax import softmax_ref

from backend_params import skip_unless_runnable
from tolerance import assert_within_torch_error

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ("triton", "cuda")


def _check(fn, ref, inputs, backend, what, factor=2.0):
    """fn's output and input gradients on ``backend`` vs ref in float64 and ref in the inputs' dtype."""
    grad = None
    results = []
    for cast, use in ((None, backend), (torch.float64, "torch"), (None, "torch")):
        leaves = [(t.to(cast) if cast else t).detach().requires_grad_(t.is_floating_point()) for t in inputs]
        with fasttx.use_backend(use):
            out = (fn if use == backend else ref)(*leaves)
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad.to(out.dtype))
        results.append([out.detach()] + [t.grad for t in leaves if t.requires_grad])
    for i, (o, t, p) in enumerate(zip(*results)):
        assert_within_torch_error(o, t, p, factor=factor if i == 0 else 1.5 * factor, what=f"{what} {backend} [{i}]")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("tk", [2049, 4099, 8193, 20011])  # past the CUDA register cache; 8193+: Triton's loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_long_rows(backend, tk, dtype):
    skip_unless_runnable("cuda", backend)
    torch.manual_seed(tk)
    x = torch.randn(3, 2, 5, tk, device="cuda", dtype=dtype)
    _check(lambda t: fasttx.softmax(t, scale=0.7, is_causal=True), lambda t: softmax_ref(t, 0.7, None, True), [x],
           backend, f"softmax Tk={tk} {dtype}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [8200, 16411, 20011])  # fp32: 2050-5003 packs of 4; bf16: 1025-2502 of 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_long_rows(backend, n, dtype):
    skip_unless_runnable("cuda", backend)
    torch.manual_seed(n)
    x = torch.randn(4, n, device="cuda", dtype=dtype)
    w, b = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    _check(lambda *t: fasttx.layer_norm(t[0], (n,), t[1], t[2]), lambda *t: F.layer_norm(t[0], (n,), t[1], t[2]),
           [x, w, b], backend, f"layer_norm N={n} {dtype}")


def _add_rms_norm(n):
    """add_rms_norm's two outputs as one (y + s), so that one backward reaches both, and torch's."""
    return (lambda x, r, w: sum(fasttx.add_rms_norm(x, r, (n,), w, 1e-6)),
            lambda x, r, w: F.rms_norm(x + r, (n,), w, 1e-6) + (x + r))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [8200, 16411, 20011])  # the same row tails, with a residual and no mean
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_rms_norm_long_rows(backend, n, dtype):
    skip_unless_runnable("cuda", backend)
    torch.manual_seed(n)
    x, r = (torch.randn(4, n, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(n, device="cuda", dtype=dtype)
    _check(*_add_rms_norm(n), [x, r, w], backend, f"add_rms_norm N={n} {dtype}")


def _float64_cases():
    d = "cuda"
    yield "bias_gelu", lambda x, b: fasttx.bias_gelu(x, b), lambda x, b: bias_gelu_ref(x, b), \
        lambda: [torch.randn(7, 129, device=d, dtype=torch.float64), torch.randn(129, device=d, dtype=torch.float64)]
    yield "layer_norm", lambda x, w: fasttx.layer_norm(x, (77,), w), lambda x, w: F.layer_norm(x, (77,), w), \
        lambda: [torch.randn(5, 77, device=d, dtype=torch.float64), torch.randn(77, device=d, dtype=torch.float64)]
    yield "add_rms_norm", *_add_rms_norm(77), \
        lambda: [torch.randn(5, 77, device=d, dtype=torch.float64) for _ in range(2)] + \
        [torch.randn(77, device=d, dtype=torch.float64)]
    yield "softmax", lambda x: fasttx.softmax(x, scale=0.5), lambda x: softmax_ref(x, 0.5), \
        lambda: [torch.randn(2, 3, 9, 300, device=d, dtype=torch.float64)]
    yield "attention", lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True), \
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), \
        lambda: [torch.randn(2, 3, 17, 32, device=d, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("name, fn, ref, make", list(_float64_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_cuda_float64(name, fn, ref, make):
    """The cuda backend's float64 instantiations (triton refuses float64; auto then takes cuda)."""
    skip_unless_runnable("cuda", "cuda")
    torch.manual_seed(0)
    _check(fn, ref, make(), "cuda", f"{name} float64")


def _misaligned(shape, dtype):
    """A contiguous tensor whose data starts 1 element past a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.randn(n + 1, device="cuda", dtype=dtype)
    return buf[1:].view(shape)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_base_pointers(backend, dtype):
    skip_unless_runnable("cuda", backend)
    torch.manual_seed(0)
    x, b = _misaligned((6, 1000), dtype), _misaligned((1000,), dtype)
    assert x.data_ptr() % 16 and b.data_ptr() % 16
    _check(lambda x, b: fasttx.bias_gelu(x, b), bias_gelu_ref, [x, b], backend, f"bias_gelu misaligned {dtype}")
    _check(lambda x, b: fasttx.layer_norm(x, (1000,), None, b), lambda x, b: F.layer_norm(x, (1000,), None, b),
           [x, b], backend, f"layer_norm misaligned {dtype}")
    r, w = _misaligned((6, 1000), dtype), _misaligned((1000,), dtype)
    _check(*_add_rms_norm(1000), [x, r, w], backend, f"add_rms_norm misaligned {dtype}")
    s = _misaligned((2, 3, 7, 999), dtype)
    _check(lambda s: fasttx.softmax(s), lambda s: softmax_ref(s), [s], backend, f"softmax misaligned {dtype}")
    q, k, v = (_misaligned((2, 3, 40, 64), dtype) for _ in range(3))
    _check(lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [q, k, v], backend,
           f"attention misaligned {dtype}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_on_cuda(backend):
    """Attention under CUDA autocast runs in the autocast dtype, as F.scaled_dot_product_attention does.
    A norm returns its input's dtype (docs/usage.md), where CUDA autocast's F.layer_norm returns float32:
    its values are held to the bf16 rule."""
    skip_unless_runnable("cuda", backend)
    torch.manual_seed(0)
    x, w = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16), torch.randn(256, device="cuda")
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda") for _ in range(3))
    with torch.autocast("cuda", dtype=torch.bfloat16), fasttx.use_backend(backend):
        got_norm = fasttx.layer_norm(x, (256,), w)
        got_attn = fasttx.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got_attn.dtype == want_attn.dtype == torch.bfloat16 and got_norm.dtype == torch.bfloat16
    truth_attn = F.scaled_dot_product_attention(*(t.to(torch.bfloat16).double() for t in (q, k, v)), is_causal=True)
    assert_within_torch_error(got_attn, truth_attn, want_attn, what=f"attention under autocast {backend}")
    truth_norm = F.layer_norm(x.double(), (256,), w.to(torch.bfloat16).double())
    assert_within_torch_error(got_norm, truth_norm, F.layer_norm(x, (256,), w.to(torch.bfloat16)),
                              what=f"layer_norm under autocast {backend}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_on_cuda(backend):
    skip_unless_runnable("cuda", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, b = torch.randn(16, 384, device="cuda"), torch.randn(384, device="cuda")
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def model(x, b, q, k, v):
        h = fasttx.layer_norm(fasttx.bias_gelu(x, b), (384,))
        return h.sum() + fasttx.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum()

    with fasttx.use_backend(backend):
        eager = model(x, b, q, k, v)
        compiled = torch.compile(model, fullgraph=True)(x, b, q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-3)
