"""The norms take the mixed parameter dtypes torch takes, and give torch's dtypes and values.

F.layer_norm takes float32 weight and bias for a bfloat16/float16 input (a bf16 model with fp32
norms, or a patched model fed bf16 activations) and F.rms_norm any float weight; both return the
input's dtype, and the parameters' gradients come in the parameters' dtype. (F.layer_norm's
forward takes a float32 bias without a weight too, and its backward then fails; fasttx's does not.) fasttx used to refuse
these, so a patched model could fail where the unpatched one ran. What torch refuses (an fp32 input
with bf16 layer_norm parameters) fasttx refuses too, with a TypeError naming the parameter.
"""
import pytest
import torch
import torch.nn.functional as F

import fasttx

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

BACKENDS = device_backend_params()
NARROW = [torch.bfloat16, torch.float16]


def _leaves(device, x_dtype, p_dtype, shape=(3, 5, 24), with_bias=True, with_weight=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w = torch.randn(shape[-1], generator=g) if with_weight else None
    b = torch.randn(shape[-1], generator=g) if with_bias else None
    to = lambda t, dt: t.to(device, dt) if t is not None else None
    return to(x, x_dtype), to(w, p_dtype), to(b, p_dtype)


def _run(fn, dtype_of, *tensors):
    """fn on copies of tensors (in dtype_of(t), or their own) that require grad; (out, grads)."""
    leaves = [t.detach().to(dtype_of(t)).requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    out.backward((torch.rand(out.shape, generator=g, dtype=torch.float64) - 0.5).to(out.device, out.dtype))
    return out.detach(), [t.grad for t in leaves if t is not None]


def _check(backend, fasttx_fn, torch_fn, *tensors):
    with fasttx.use_backend(backend):
        got, got_grads = _run(fasttx_fn, lambda t: t.dtype, *tensors)
    ref, ref_grads = _run(torch_fn, lambda t: t.dtype, *tensors)  # torch in the same mixed dtypes
    truth, truth_grads = _run(torch_fn, lambda t: torch.float64, *tensors)
    assert got.dtype == ref.dtype
    assert_within_torch_error(got, truth.to(got.dtype), ref, what=f"{backend} out")
    for name, o, t, p in zip(("x", "weight", "bias"), got_grads, truth_grads, ref_grads):
        assert o.dtype == p.dtype, f"grad {name}: {o.dtype} != torch's {p.dtype}"
        assert_within_torch_error(o, t.to(o.dtype), p, factor=3, what=f"{backend} grad {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", NARROW, ids=str)
@pytest.mark.parametrize("params", ["weight+bias", "weight", "bias"])
def test_layer_norm_narrow_input_float32_params(device, backend, x_dtype, params):
    skip_unless_runnable(device, backend)
    x, w, b = _leaves(device, x_dtype, torch.float32, with_weight="weight" in params, with_bias="bias" in params)
    ref = lambda x, w, b: F.layer_norm(x, (24,), w, b)
    if params == "bias":  # torch's forward takes it, its backward fails: the same forward, with a backward
        ref = lambda x, w, b: F.layer_norm(x.to(b.dtype), (24,), w, b).to(x.dtype)
    _check(backend, lambda x, w, b: fasttx.layer_norm(x, 24, w, b), ref, x, w, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", NARROW, ids=str)
def test_add_layer_norm_narrow_input_float32_params(device, backend, x_dtype):
    skip_unless_runnable(device, backend)
    x, w, b = _leaves(device, x_dtype, torch.float32)
    r = _leaves(device, x_dtype, torch.float32, seed=5)[0]
    with fasttx.use_backend(backend):
        y, s = fasttx.add_layer_norm(x, r, 24, w, b)
    assert y.dtype == s.dtype == x_dtype
    torch.testing.assert_close(s, x + r)
    # the normed output and every gradient against torch's layer_norm(x + r)
    _check(backend, lambda x, r, w, b: fasttx.add_layer_norm(x, r, 24, w, b)[0],
           lambda x, r, w, b: F.layer_norm(x + r, (24,), w, b), x, r, w, b)


RMS_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
             (torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float64, torch.float32),
             (torch.float32, torch.float64)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", RMS_PAIRS, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_any_float_weight(device, backend, x_dtype, w_dtype, eps):
    skip_unless_runnable(device, backend)
    if torch.float64 in (x_dtype, w_dtype) and backend in ("triton", "cuda"):
        pytest.skip("float64 runs on the cpu and torch backends")
    x, w, _ = _leaves(device, x_dtype, w_dtype, with_bias=False)
    _check(backend, lambda x, w: fasttx.rms_norm(x, 24, w, eps), lambda x, w: F.rms_norm(x, (24,), w, eps), x, w)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", RMS_PAIRS, ids=str)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_add_rms_norm_any_float_weight(device, backend, x_dtype, w_dtype, eps):
    skip_unless_runnable(device, backend)
    if torch.float64 in (x_dtype, w_dtype) and backend in ("triton", "cuda"):
        pytest.skip("float64 runs on the cpu and torch backends")
    x, w, _ = _leaves(device, x_dtype, w_dtype, with_bias=False)
    r = _leaves(device, x_dtype, w_dtype, seed=5)[0]
    with fasttx.use_backend(backend):
        y, s = fasttx.add_rms_norm(x, r, 24, w, eps)
    assert y.dtype == s.dtype == x_dtype
    torch.testing.assert_close(s, x + r)
    # the normed output and every gradient against torch's rms_norm(x + r)
    _check(backend, lambda x, r, w: fasttx.add_rms_norm(x, r, 24, w, eps)[0],
           lambda x, r, w: F.rms_norm(x + r, (24,), w, eps), x, r, w)


@pytest.mark.parametrize("x_dtype,w_dtype", RMS_PAIRS, ids=str)
def test_add_rms_norm_default_eps_is_the_inputs_not_the_weights(x_dtype, w_dtype):
    """eps=None is the epsilon of x + residual's statistics dtype, as for torch's rms_norm(x + r, w): a float64
    weight must not make it float64's (N = 1 and small x, where eps dominates mean(x^2))."""
    g = torch.Generator().manual_seed(0)
    x, r = ((1e-3 * torch.randn(4, 1, generator=g)).to(x_dtype) for _ in range(2))
    w = torch.ones(1, dtype=w_dtype)
    torch.testing.assert_close(fasttx.add_rms_norm(x, r, 1, w), fasttx.ops.add_rms_norm_ref(x, r, (1,), w))


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16), (torch.float64, torch.float32),
                                             (torch.bfloat16, torch.float64)], ids=str)
def test_layer_norm_refuses_what_torch_refuses(x_dtype, p_dtype):
    x, w, b = _leaves("cpu", x_dtype, p_dtype)
    with pytest.raises(RuntimeError):
        F.layer_norm(x, (24,), w, b)
    with pytest.raises(TypeError, match=r"fasttx.layer_norm: weight has dtype .* but x has"):
        fasttx.layer_norm(x, 24, w, b)
    with pytest.raises(TypeError, match=r"fasttx.layer_norm: bias has dtype"):
        fasttx.layer_norm(x, 24, None, b)


@pytest.mark.parametrize("x_dtype", NARROW, ids=str)
@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_modules_with_float32_params_take_narrow_input(x_dtype, module):
    torch.manual_seed(0)
    ours = getattr(fasttx.nn, module)(24)
    theirs = getattr(torch.nn, module)(24)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 24).to(x_dtype)
    y, y_ref = ours(x), theirs(x)
    assert y.dtype == y_ref.dtype == x_dtype
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert ours.weight.grad.dtype == theirs.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-2, atol=1e-2)


def test_a_patched_model_runs_where_the_unpatched_one_does():
    # A bf16 linear feeding an fp32 LayerNorm: torch runs it, so the patched model must.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16).to(torch.bfloat16), torch.nn.LayerNorm(16))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expect = model(x)
    fasttx.patch(model)
    try:
        got = model(x)
    finally:
        fasttx.unpatch(model)
    assert got.dtype == expect.dtype == torch.bfloat16
    torch.testing.assert_close(got, expect)
