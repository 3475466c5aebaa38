"""glu (act(gate) * up) against PyTorch: every backend, dtype, activation and awkward shape."""
import pytest
import torch

import fasttx
from fasttx import backends
from fasttx.ops.glu import ACTIVATIONS, IMPLEMENTATIONS, glu_ref

from backend_params import device_backend_params, skip_unless_runnable
from tolerance import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Flat sizes 1, 7 (under one vector), 77 x 3 and 2 x 1537 (vector tails), 4 x 3072.
SHAPES = [(1,), (7, 1), (3, 77), (2, 1537), (4, 3072)]


def _run(fn, gate, up, grad):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    y = fn(gate, up)
    y.backward(grad)
    return y.detach(), gate.grad, up.grad


def check_against_reference(device, backend, dtype, activation, gate, up):
    """fasttx in ``dtype`` vs the float64 truth, with PyTorch's own ``dtype`` error as the yardstick."""
    grad = torch.randn(gate.shape, device=device, dtype=dtype)
    with fasttx.use_backend(backend):
        out = _run(lambda g, u: fasttx.glu(g, u, activation), gate, up, grad)
    ref = lambda g, u: glu_ref(g, u, activation)
    truth = _run(ref, gate.double(), up.double(), grad.double())
    torch_out = _run(ref, gate, up, grad)
    for name, o, t, p, factor in zip(("y", "grad_gate", "grad_up"), out, truth, torch_out, (2, 3, 3)):
        assert_within_torch_error(o, t, p, factor=factor, what=f"{backend} {dtype} {activation} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, activation, shape):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    gate = 3 * torch.randn(shape, device=device, dtype=dtype)
    up = torch.randn(shape, device=device, dtype=dtype)
    check_against_reference(device, backend, dtype, activation, gate, up)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_whole_range_including_tails(device, backend, dtype, activation):
    # gate swept over [-30, 30]: sigmoid's and Phi's saturation on both sides, where exp(-z)
    # overflows (silu) or exp(-z^2/2) underflows (gelu), and the region near 0.
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    gate = torch.linspace(-30, 30, 4 * 1001, device=device).to(dtype).view(4, 1001)
    up = torch.randn(4, 1001, device=device, dtype=dtype)
    check_against_reference(device, backend, dtype, activation, gate, up)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_inputs(device, backend, layout):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    if layout == "transposed":
        gate, up = torch.randn(77, 33, device=device).t(), torch.randn(33, 77, device=device)
    elif layout == "strided":
        gate = torch.randn(12, 20, 3 * 31, device=device)[::3, ::5, ::3]
        up = torch.randn(gate.shape, device=device)
    else:  # stride 0 along the rows, as x.expand makes (the two halves of a tensor.chunk would be views too)
        gate = torch.randn(1, 100, device=device).expand(9, 100)
        up = torch.randn(9, 200, device=device)[:, 100:]
    assert not gate.is_contiguous()
    check_against_reference(device, backend, torch.float32, "silu", gate, up)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", [(0, 16), (4, 0, 16), (3, 0)], ids=str)
def test_empty(device, backend, shape):
    skip_unless_runnable(device, backend)
    gate = torch.randn(shape, device=device, requires_grad=True)
    up = torch.randn(shape, device=device, requires_grad=True)
    with fasttx.use_backend(backend):
        y = fasttx.glu(gate, up)
        y.sum().backward()
    assert y.shape == gate.shape and gate.grad.shape == gate.shape and up.grad.shape == up.shape


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_and_gradgradcheck_float64_cpu(activation):
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    gate = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    fn = lambda g, u: fasttx.glu(g, u, activation)
    with fasttx.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (gate, up))
        assert torch.autograd.gradgradcheck(fn, (gate, up))  # the graphed backward: torch's formula


def test_saves_gate_and_up_but_never_the_activation():
    skip_unless_runnable("cpu", "cpu")
    gate = torch.randn(64, 32, requires_grad=True)
    up = torch.randn(64, 32, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fasttx.glu(gate, up)
    assert sum(seen.values()) == 2 * 4 * 64 * 32
    assert set(seen) == {gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()}


def test_functorch_grad_runs_the_reference():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    got = torch.func.grad(lambda g: fasttx.glu(g, up).sum())(gate)
    expected = torch.func.grad(lambda g: glu_ref(g, up).sum())(gate)
    torch.testing.assert_close(got, expected)


def test_autocast_promotes_mixed_inputs_as_torch_multiplies_them():
    gate = torch.randn(4, 8, dtype=torch.bfloat16)
    up = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fasttx.glu(gate, up)
        expected = glu_ref(gate, up)
    # torch rounds silu(gate) to bf16 before the float32 product; the op computes act(gate) in the
    # promoted float32 and rounds once, so the two differ by up to half a bf16 ulp of act(gate).
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, glu_ref(gate.float(), up))
    torch.testing.assert_close(y, expected, rtol=2 ** -8, atol=1e-5)


# ---- bad input -------------------------------------------------------------------

def test_shapes_that_differ_are_named():
    with pytest.raises(ValueError, match=r"fasttx.glu: gate and up must have the same shape.*\(4, 8\) and \(1, 8\)"):
        fasttx.glu(torch.randn(4, 8), torch.randn(1, 8))


def test_integer_dtype_is_rejected():
    with pytest.raises(TypeError, match="fasttx.glu: gate must be float16, bfloat16, float32 or float64, got torch.int64"):
        fasttx.glu(torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64))


def test_mismatched_dtypes_and_devices_are_rejected():
    with pytest.raises(TypeError, match="up has dtype torch.float16 but gate has torch.float32"):
        fasttx.glu(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="up is on meta but gate is on cpu"):
        fasttx.glu(torch.randn(4, 8), torch.randn(4, 8, device="meta"))


def test_unknown_activation_and_non_tensor_are_rejected():
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'gelu_tanh', 'gelu'\), got 'relu'"):
        fasttx.glu(torch.randn(4, 8), torch.randn(4, 8), activation="relu")
    with pytest.raises(TypeError, match="up must be a torch.Tensor, got list"):
        fasttx.glu(torch.randn(4, 8), [0.0] * 8)


# ---- torch.library and torch.compile ------------------------------------------------

def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    gate = torch.randn(6, 33, requires_grad=True)
    up = torch.randn(6, 33, requires_grad=True)
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.fasttx.glu.default, (gate, up, activation, "auto"))


def test_torch_compile_fullgraph_matches_eager():
    def block(gate, up):
        return fasttx.glu(gate * 2, up, "gelu_tanh").sum(-1)

    torch._dynamo.reset()
    # aot_eager: Dynamo (fullgraph: raises on any graph break) and AOTAutograd through the fake and
    # autograd registrations, without inductor's C++ compile time.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    gate = torch.randn(5, 64, requires_grad=True)
    up = torch.randn(5, 64, requires_grad=True)
    out = compiled(gate, up)
    out.sum().backward()
    grads = (gate.grad, up.grad)
    gate.grad = up.grad = None
    expected = block(gate, up)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, (gate.grad, up.grad))


def test_auto_prefers_the_cpu_kernel_on_cpu_tensors():
    skip_unless_runnable("cpu", "cpu")
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    assert backends.choose("glu", IMPLEMENTATIONS, "auto", gate, up).backend == "cpu"
