"""glu_ffn against PyTorch: every backend, activation, dtype and awkward shape; its saved bytes; GLUFFN."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.glu import glu_ref
from fasttx.ops.glu_ffn import ACTIVATIONS, glu_ffn_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

# (leading dims of x, d_model, d_hidden): 77, 77 and 2 x 257 tokens; prime and odd widths. One token
# runs in float32 only (test_one_token_float32): in bf16 its weight gradients are outer products of
# a few hundred values, and the max error then turns on whether torch's double rounding of act(gate)
# and act(gate) * grad happens to land on the truth at one element (seen: torch 0.25 ulp, a
# single fp32 rounding 0.93 ulp, both ordinary bf16 errors).
SHAPES = [((7, 11), 37, 101), ((77,), 100, 257), ((2, 257), 64, 171)]
NAMES = ("out", "grad_x", "grad_w_gate", "grad_w_up", "grad_w_down", "grad_b_gate", "grad_b_up", "grad_b_down")


def _params(d_model, d_hidden, dtype, device, bias=(True, True, True)):
    torch.manual_seed(1)
    w_gate = torch.randn(d_hidden, d_model, device=device) / max(d_model, 1) ** 0.5
    w_up = torch.randn(d_hidden, d_model, device=device) / max(d_model, 1) ** 0.5
    w_down = torch.randn(d_model, d_hidden, device=device) / max(d_hidden, 1) ** 0.5
    b_gate = torch.randn(d_hidden, device=device) if bias[0] else None
    b_up = torch.randn(d_hidden, device=device) if bias[1] else None
    b_down = torch.randn(d_model, device=device) if bias[2] else None
    return [t.to(dtype) if t is not None else None for t in (w_gate, w_up, w_down, b_gate, b_up, b_down)]


def _call(fn, x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation):
    return fn(x, w_gate, w_up, w_down, activation, b_gate, b_up, b_down)


def _run(fn, x, params, grad, activation):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, *params)]
    out = _call(fn, *leaves, activation)
    out.backward(grad)
    return (out.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def check_against_reference(device, backend, activation, x, params):
    """fasttx vs the float64 truth, with PyTorch's own error in x's dtype as the yardstick."""
    grad = torch.randn(*x.shape[:-1], params[2].shape[0], device=device, dtype=x.dtype)
    run = lambda fn, dtype: _run(fn, x.to(dtype), [p.to(dtype) if p is not None else None for p in params],
                                 grad.to(dtype), activation)
    with fasttx.use_backend(backend):
        out = run(fasttx.glu_ffn, x.dtype)
    truth = run(glu_ffn_ref, torch.float64)
    torch_out = run(glu_ffn_ref, x.dtype)
    for name, o, t, p in zip(NAMES, out, truth, torch_out):
        if t is None:
            assert o is None, f"{name} should be None"
            continue
        assert_within_torch_error(o, t, p, factor=2 if name == "out" else 3,
                                  what=f"{backend} {x.dtype} {activation} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,d_model,d_hidden", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, activation, lead, d_model, d_hidden):
    skip_unless_runnable(device, backend)
    params = _params(d_model, d_hidden, dtype, device)
    x = torch.randn(*lead, d_model, device=device, dtype=dtype)
    check_against_reference(device, backend, activation, x, params)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_one_token_float32(device, backend, activation):
    skip_unless_runnable(device, backend)
    params = _params(64, 172, torch.float32, device)
    check_against_reference(device, backend, activation, torch.randn(1, 64, device=device), params)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("bias", [(False, False, False), (True, False, True), (False, True, False)], ids=str)
def test_without_biases_and_in_float16(device, backend, bias):
    skip_unless_runnable(device, backend)
    x = torch.randn(3, 29, 100, device=device, dtype=torch.float16)
    check_against_reference(device, backend, "silu", x, _params(100, 37, torch.float16, device, bias=bias))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_llama_like_width(device, backend):
    """A LLaMA-shaped block (H = 2.6875 d, bf16, no biases) at a size the CPU runs quickly."""
    skip_unless_runnable(device, backend)
    x = torch.randn(2, 128, 256, device=device, dtype=torch.bfloat16)
    check_against_reference(device, backend, "silu", x, _params(256, 688, torch.bfloat16, device, bias=(False,) * 3))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_inputs(device, backend, layout):
    skip_unless_runnable(device, backend)
    if layout == "transposed":
        x = torch.randn(64, 77, device=device).t()
    elif layout == "strided":
        x = torch.randn(12, 20, 3 * 64, device=device)[::3, ::5, ::3]
    else:
        x = torch.randn(1, 64, device=device).expand(9, 64)
    assert not x.is_contiguous()
    w_gate, w_up, w_down, b_gate, b_up, b_down = _params(64, 96, torch.float32, device)
    check_against_reference(device, backend, "gelu",
                            x, [w_gate.t().contiguous().t(), w_up[:, ::1], torch.randn(96, 64, device=device).t(),
                                b_gate, b_up, b_down])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("lead,d_model,d_hidden", [((0,), 16, 64), ((2, 0), 16, 64), ((5,), 16, 0)], ids=str)
def test_empty(device, backend, lead, d_model, d_hidden):
    skip_unless_runnable(device, backend)
    x = torch.randn(*lead, d_model, device=device)
    check_against_reference(device, backend, "silu", x, _params(d_model, d_hidden, torch.float32, device))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    skip_unless_runnable(device, backend)
    x = torch.randn(1031, 100, device=device)
    params = _params(100, 401, torch.float32, device)
    grad = torch.randn(1031, 100, device=device)
    with fasttx.use_backend(backend):
        first, second = (_run(fasttx.glu_ffn, x, params, grad, "silu") for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_and_gradgradcheck_float64_cpu(activation):
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in _params(8, 13, torch.float64, "cpu")]
    fn = lambda *a: _call(fasttx.glu_ffn, *a, activation)
    with fasttx.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (x, *params))
        assert torch.autograd.gradgradcheck(fn, (x, *params))  # the graphed backward: torch's formula


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
        _call(fn, x, *params, "silu")
    return sum(seen.values())


def test_saves_x_gate_and_up_but_never_the_product():
    skip_unless_runnable("cpu", "cpu")
    m, d, h = 64, 32, 88
    x = torch.randn(m, d, requires_grad=True)
    params = [p.requires_grad_() if p is not None else None
              for p in _params(d, h, torch.float32, "cpu", bias=(False,) * 3)]
    fused = _saved_activation_bytes(fasttx.glu_ffn, x, params)
    eager = _saved_activation_bytes(glu_ffn_ref, x, params)
    assert fused == 4 * (m * d + 2 * m * h)    # x, gate and up
    assert eager == 4 * (m * d + 4 * m * h)    # x, gate(x), silu's output, up(x) and the product
    assert (fused - 4 * m * d) / (eager - 4 * m * d) == 0.5


# ---- the module ------------------------------------------------------------------

def test_module_loads_a_llama_mlp_state_dict_and_matches_it():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=136, num_attention_heads=4, hidden_act="silu",
                                      mlp_bias=False)
    torch.manual_seed(0)
    ref = LlamaMLP(config)
    ffn = fasttx.nn.GLUFFN(48, 136)
    assert list(ffn.state_dict()) == list(ref.state_dict())
    ffn.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(ffn(x), ref(x))


def test_module_with_bias_gelu_tanh_its_dtype_and_repr():
    torch.manual_seed(0)
    ffn = fasttx.nn.GLUFFN(16, 40, activation="gelu_tanh", bias=True, dtype=torch.float64)
    assert ffn.gate_proj.bias is not None and ffn.down_proj.weight.dtype == torch.float64
    x = torch.randn(2, 16, dtype=torch.float64)
    expected = ffn.down_proj(glu_ref(ffn.gate_proj(x), ffn.up_proj(x), "gelu_tanh"))
    torch.testing.assert_close(ffn(x), expected)
    assert "activation='gelu_tanh'" in repr(ffn)
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'gelu_tanh', 'gelu'\), got 'relu'"):
        fasttx.nn.GLUFFN(16, 64, activation="relu")


# ---- bad input -------------------------------------------------------------------

def test_weights_of_wrong_shape_are_named():
    w_gate, w_up, w_down, b_gate, b_up, b_down = _params(8, 32, torch.float32, "cpu")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"fasttx.glu_ffn: w_gate must have shape \(d_hidden, 8\).*\(4, 8\).*got \(32, 9\)"):
        fasttx.glu_ffn(x, torch.randn(32, 9), w_up, w_down)
    with pytest.raises(ValueError, match=r"w_up must have w_gate's shape \(32, 8\), got \(31, 8\)"):
        fasttx.glu_ffn(x, w_gate, torch.randn(31, 8), w_down)
    with pytest.raises(ValueError, match=r"w_down must have shape \(d_out, 32\).*got \(8, 31\)"):
        fasttx.glu_ffn(x, w_gate, w_up, torch.randn(8, 31))
    with pytest.raises(ValueError, match=r"b_up must have shape \(32,\), got \(8,\)"):
        fasttx.glu_ffn(x, w_gate, w_up, w_down, b_up=b_down)


def test_bad_dtypes_devices_and_activation_are_rejected():
    w_gate, w_up, w_down, b_gate, b_up, b_down = _params(8, 32, torch.float32, "cpu")
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        fasttx.glu_ffn(torch.ones(4, 8, dtype=torch.int64), w_gate, w_up, w_down)
    with pytest.raises(TypeError, match="w_down has dtype torch.float16 but x has torch.float32"):
        fasttx.glu_ffn(torch.randn(4, 8), w_gate, w_up, w_down.half())
    with pytest.raises(ValueError, match="b_down is on meta but x is on cpu"):
        fasttx.glu_ffn(torch.randn(4, 8), w_gate, w_up, w_down, b_down=b_down.to("meta"))
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'swish'"):
        fasttx.glu_ffn(torch.randn(4, 8), w_gate, w_up, w_down, activation="swish")
    with pytest.raises(TypeError, match="w_up must be a torch.Tensor, got NoneType"):
        fasttx.glu_ffn(torch.randn(4, 8), w_gate, None, w_down)


# ---- autocast, torch.library and torch.compile -----------------------------------------

def test_autocast_runs_in_the_autocast_dtype_with_float32_grads():
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    params = [p.requires_grad_() if p is not None else None
              for p in _params(16, 24, torch.float32, "cpu", bias=(True, False, True))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(fasttx.glu_ffn, x, *params, "silu")
        expected = _call(glu_ffn_ref, x, *params, "silu")
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and params[0].grad.dtype == torch.float32


def test_opcheck():
    x = torch.randn(6, 16, requires_grad=True)
    w_gate, w_up, w_down, b_gate, b_up, b_down = [p.requires_grad_() if p is not None else None
                                                  for p in _params(16, 40, torch.float32, "cpu", (True, False, True))]
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.fasttx.glu_ffn_forward.default,
                              (x, w_gate, b_gate, w_up, b_up, w_down, b_down, activation, "auto"))


def test_torch_compile_fullgraph_keeps_the_fused_op():
    ops_seen = []

    def record(gm, example_inputs):
        ops_seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    def block(x, *params):
        return _call(fasttx.glu_ffn, x * 2, *params, "silu").sum(-1)

    torch._dynamo.reset()
    x = torch.randn(5, 16, requires_grad=True)
    params = [p.requires_grad_() for p in _params(16, 40, torch.float32, "cpu")]
    out = torch.compile(block, fullgraph=True, backend=record)(x, *params)
    assert any("fasttx.glu_ffn_forward" in op for op in ops_seen), ops_seen
    torch.testing.assert_close(out, block(x, *params))
    out.sum().backward()
    grads = [x.grad] + [p.grad for p in params]
    for t in (x, *params):
        t.grad = None
    block(x, *params).sum().backward()
    torch.testing.assert_close(grads, [x.grad] + [p.grad for p in params])


def test_functorch_grad_runs_the_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64)
    params = _params(8, 12, torch.float64, "cpu")
    got = torch.func.grad(lambda t: _call(fasttx.glu_ffn, t, *params, "silu").sum())(x)
    expected = torch.func.grad(lambda t: _call(glu_ffn_ref, t, *params, "silu").sum())(x)
    torch.testing.assert_close(got, expected)
