"""gelu_ffn against PyTorch: every backend, activation, dtype and awkward shape, and its saved bytes."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.gelu_ffn import ACTIVATIONS, activation_ref, gelu_ffn_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

# (leading dims of x, d_model, d_hidden): token counts 1, 77 and 4096, batched
# and not, d_model 64, 100 and 768 with d_hidden = 4 d_model and odd.
SMALL_SHAPES = [((1,), 64, 256), ((7, 11), 64, 257), ((4, 1024), 64, 256),
                ((77,), 100, 400), ((2, 2048), 100, 401), ((1, 1), 100, 401)]
GPT2_SHAPES = [((77,), 768, 3072), ((1,), 768, 3071), ((2, 2048), 768, 3072)]
NAMES = ("out", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2")


def _params(d_model, d_hidden, dtype, device, bias=True):
    torch.manual_seed(1)
    w1 = torch.randn(d_hidden, d_model, device=device) / d_model ** 0.5
    w2 = torch.randn(d_model, d_hidden, device=device) / d_hidden ** 0.5
    b1 = torch.randn(d_hidden, device=device) if bias else None
    b2 = torch.randn(d_model, device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (w1, b1, w2, b2)]


def _run(fn, x, params, grad):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, *params)]
    out = fn(*leaves)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def check_against_reference(device, backend, activation, x, params):
    """fasttx vs the float64 truth, with PyTorch's own error in x's dtype as the yardstick."""
    grad = torch.randn(*x.shape[:-1], params[2].shape[0], device=device, dtype=x.dtype)
    run = lambda fn, dtype: _run(lambda *a: fn(*a, activation=activation),
                                 x.to(dtype), [p.to(dtype) if p is not None else None for p in params], grad.to(dtype))
    with fasttx.use_backend(backend):
        out = run(fasttx.gelu_ffn, x.dtype)
    truth = run(gelu_ffn_ref, torch.float64)
    torch_out = run(gelu_ffn_ref, x.dtype)
    for name, o, t, p in zip(NAMES, out, truth, torch_out):
        if t is None:
            assert o is None, f"{name} should be None"
            continue
        assert_within_torch_error(o, t, p, factor=2 if name == "out" else 3, what=f"{backend} {x.dtype} {activation} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,d_model,d_hidden", SMALL_SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, activation, lead, d_model, d_hidden):
    skip_unless_runnable(device, backend)
    params = _params(d_model, d_hidden, dtype, device)
    x = torch.randn(*lead, d_model, device=device, dtype=dtype)
    check_against_reference(device, backend, activation, x, params)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype,activation", [(torch.float32, "gelu"), (torch.float32, "relu"),
                                              (torch.bfloat16, "gelu_tanh")], ids=str)
@pytest.mark.parametrize("lead,d_model,d_hidden", GPT2_SHAPES, ids=str)
def test_matches_reference_at_gpt2_width(device, backend, dtype, activation, lead, d_model, d_hidden):
    skip_unless_runnable(device, backend)
    params = _params(d_model, d_hidden, dtype, device)
    x = torch.randn(*lead, d_model, device=device, dtype=dtype)
    check_against_reference(device, backend, activation, x, params)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_without_biases_and_in_float16(device, backend, activation):
    skip_unless_runnable(device, backend)
    x = torch.randn(3, 29, 100, device=device, dtype=torch.float16)
    check_against_reference(device, backend, activation, x, _params(100, 37, torch.float16, device, bias=False))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["transposed", "strided", "broadcast"])
def test_non_contiguous_and_broadcast_inputs(device, backend, layout):
    skip_unless_runnable(device, backend)
    if layout == "transposed":
        x = torch.randn(64, 77, device=device).t()
    elif layout == "strided":
        x = torch.randn(12, 20, 3 * 64, device=device)[::3, ::5, ::3]
    else:
        x = torch.randn(1, 64, device=device).expand(9, 64)
    assert not x.is_contiguous()
    w1, b1, w2, b2 = _params(64, 96, torch.float32, device)
    check_against_reference(device, backend, "gelu", x, [w1.t().contiguous().t(), b1, w2[:, ::1], b2])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("lead,d_model,d_hidden", [((0,), 16, 64), ((2, 0), 16, 64), ((5,), 16, 0)], ids=str)
def test_empty(device, backend, lead, d_model, d_hidden):
    skip_unless_runnable(device, backend)
    x = torch.randn(*lead, d_model, device=device)
    check_against_reference(device, backend, "gelu", x, _params(d_model, d_hidden, torch.float32, device))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    skip_unless_runnable(device, backend)
    x = torch.randn(1031, 100, device=device)
    params = _params(100, 401, torch.float32, device)
    grad = torch.randn(1031, 100, device=device)
    with fasttx.use_backend(backend):
        first, second = (_run(fasttx.gelu_ffn, x, params, grad) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64_cpu(activation):
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in _params(8, 13, torch.float64, "cpu")]
    if activation == "relu":  # keep the pre-activations off relu's kink at 0, where the numerical gradient is wrong
        with torch.no_grad():
            params[1] += torch.where(F.linear(x, params[0], params[1]).abs().amin(0) < 1e-3, 0.1, 0.0)
    with fasttx.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: fasttx.gelu_ffn(*a, activation=activation), (x, *params))


# ---- what is kept for backward -------------------------------------------------------

def _saved_activation_bytes(fn, x, params):
    """Bytes autograd keeps for backward, counted by saved_tensors_hooks, less the parameters."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, *params)
    return sum(seen.values())


def test_saves_the_pre_activation_but_never_the_activation():
    skip_unless_runnable("cpu", "cpu")
    m, d, h = 64, 32, 128
    x = torch.randn(m, d, requires_grad=True)
    params = [p.requires_grad_() for p in _params(d, h, torch.float32, "cpu")]
    fused = _saved_activation_bytes(fasttx.gelu_ffn, x, params)
    eager = _saved_activation_bytes(gelu_ffn_ref, x, params)
    assert fused == 4 * (m * d + m * h)        # x and preact
    assert eager == 4 * (m * d + 2 * m * h)    # x, fc1's output and gelu's output
    assert fused / eager <= 0.6


# ---- the module ------------------------------------------------------------------

def test_module_matches_a_torch_mlp_and_shares_its_state_dict():
    torch.manual_seed(0)
    ffn = fasttx.nn.GELUFFN(48, 192, activation="gelu_tanh")
    ref = torch.nn.Module()
    ref.fc1, ref.fc2 = torch.nn.Linear(48, 192), torch.nn.Linear(192, 48)
    assert list(ffn.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    ref.load_state_dict(ffn.state_dict())
    ffn.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 48)
    expected = ref.fc2(activation_ref(ref.fc1(x), "gelu_tanh"))
    torch.testing.assert_close(ffn(x), expected)


def test_module_without_bias_and_its_dtype_and_repr():
    ffn = fasttx.nn.GELUFFN(16, 64, activation="relu", bias=False, dtype=torch.bfloat16)
    assert ffn.fc1.bias is None and ffn.fc2.weight.dtype == torch.bfloat16
    assert ffn(torch.randn(2, 16, dtype=torch.bfloat16)).shape == (2, 16)
    assert "activation='relu'" in repr(ffn)
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'gelu_tanh', 'relu'\), got 'silu'"):
        fasttx.nn.GELUFFN(16, 64, activation="silu")


# ---- bad input -------------------------------------------------------------------

def test_w1_of_wrong_shape_names_both_shapes():
    w1, b1, w2, b2 = _params(8, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"w1 must have shape \(d_hidden, 8\).*\(4, 8\).*got \(32, 9\)"):
        fasttx.gelu_ffn(torch.randn(4, 8), torch.randn(32, 9), b1, w2, b2)


def test_w2_and_biases_of_wrong_shape_are_rejected():
    w1, b1, w2, b2 = _params(8, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"w2 must have shape \(d_out, 32\).*got \(8, 31\)"):
        fasttx.gelu_ffn(torch.randn(4, 8), w1, b1, torch.randn(8, 31), b2)
    with pytest.raises(ValueError, match=r"b1 must have shape \(32,\), got \(8,\)"):
        fasttx.gelu_ffn(torch.randn(4, 8), w1, b2, w2, b2)


def test_bad_dtypes_devices_and_activation_are_rejected():
    w1, b1, w2, b2 = _params(8, 32, torch.float32, "cpu")
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        fasttx.gelu_ffn(torch.ones(4, 8, dtype=torch.int64), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="w2 has dtype torch.float16 but x has torch.float32"):
        fasttx.gelu_ffn(torch.randn(4, 8), w1, b1, w2.half(), b2)
    with pytest.raises(ValueError, match="b2 is on meta but x is on cpu"):
        fasttx.gelu_ffn(torch.randn(4, 8), w1, b1, w2, b2.to("meta"))
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'swish'"):
        fasttx.gelu_ffn(torch.randn(4, 8), w1, b1, w2, b2, activation="swish")


# ---- torch.library and torch.compile ------------------------------------------------

def test_opcheck():
    x = torch.randn(6, 16, requires_grad=True)
    params = [p.requires_grad_() for p in _params(16, 40, torch.float32, "cpu")]
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.fasttx.gelu_ffn_forward.default, (x, *params, activation, "auto"))


def test_torch_compile_fullgraph_keeps_the_fused_op():
    ops_seen = []

    def record(gm, example_inputs):
        ops_seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    def block(x, *params):
        return fasttx.gelu_ffn(x * 2, *params).sum(-1)

    torch._dynamo.reset()
    x = torch.randn(5, 16, requires_grad=True)
    params = [p.requires_grad_() for p in _params(16, 40, torch.float32, "cpu")]
    out = torch.compile(block, fullgraph=True, backend=record)(x, *params)
    assert any("fasttx.gelu_ffn_forward" in op for op in ops_seen), ops_seen
    torch.testing.assert_close(out, block(x, *params))


# ---- the weight-gradient GEMM of the CPU backward (csrc/cpu/linear_weight_grad.cpp) ------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,o,i", [(1, 2, 4), (77, 16, 64), (1000, 100, 401), (2049, 64, 256), (33, 7, 40),
                                   (300, 64, 64), (0, 8, 16)], ids=str)
def test_linear_weight_grad_matches_grad_out_t_x(dtype, m, o, i):
    """grad_out^T x, whether it transposes grad_out first (bf16, even O, x at least twice as wide) or not."""
    skip_unless_runnable("cpu", "cpu")
    from fasttx import backends
    torch.manual_seed(m)
    grad_out, x = torch.randn(m, o).to(dtype), torch.randn(m, i).to(dtype)
    got = backends.extension().linear_weight_grad_cpu(grad_out, x)
    truth = grad_out.double().t() @ x.double()
    assert got.dtype == dtype and got.shape == (o, i)
    assert_within_torch_error(got, truth, grad_out.t() @ x, factor=2, what=f"grad_w {dtype} {(m, o, i)}")
    assert torch.equal(got, backends.extension().linear_weight_grad_cpu(grad_out, x))


def test_linear_weight_grad_names_bad_shapes():
    skip_unless_runnable("cpu", "cpu")
    from fasttx import backends
    with pytest.raises(RuntimeError, match=r"must be 2-D with the same M, got \[4, 3\] and \[5, 2\]"):
        backends.extension().linear_weight_grad_cpu(torch.randn(4, 3), torch.randn(5, 2))
