"""bias_gelu against PyTorch: every backend, dtype, approximation and awkward shape."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx import backends
from fasttx.ops.bias_gelu import IMPLEMENTATIONS

from backend_params import device_backend_params, skip_unless_free_memory, skip_unless_runnable
from tolerance import assert_within_torch_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
APPROX = ["none", "tanh"]
# Leading dims of several ranks and last dims 1, 7, 77, 1000, 1537, 3072.
SHAPES = [(1, 1), (7, 7), (77,), (3, 5, 77), (2, 1000), (3, 1537), (4, 3072)]


def _run(fn, x, bias, grad):
    x = x.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    y = fn(x, bias)
    y.backward(grad)
    return y.detach(), x.grad, bias.grad


def check_against_reference(device, backend, dtype, approximate, x, bias):
    """fasttx in ``dtype`` vs the float64 truth, with PyTorch's own ``dtype`` error as the yardstick."""
    grad = torch.randn(x.shape, device=device, dtype=dtype)
    with fasttx.use_backend(backend):
        out = _run(lambda a, b: fasttx.bias_gelu(a, b, approximate), x, bias, grad)
    truth = _run(lambda a, b: F.gelu(a + b, approximate=approximate), x.double(), bias.double(), grad.double())
    torch_out = _run(lambda a, b: F.gelu(a + b, approximate=approximate), x, bias, grad)
    for name, o, t, p, factor in zip(("y", "grad_x", "grad_bias"), out, truth, torch_out, (2, 3, 3)):
        assert_within_torch_error(o, t, p, factor=factor, what=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, backend, dtype, approximate, shape):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = 3 * torch.randn(shape, device=device, dtype=dtype)
    bias = torch.randn(shape[-1], device=device, dtype=dtype)
    check_against_reference(device, backend, dtype, approximate, x, bias)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
def test_whole_range_including_tails(device, backend, dtype, approximate):
    # A dense sweep of z = x + bias over [-12, 12]: both tails of Phi (the CPU's
    # float erf gradient takes Phi(-|z|) from its own branch), the region near 0,
    # and the saturation where exp(-z^2/2) underflows.
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.linspace(-12, 12, 4 * 3001, device=device).to(dtype).view(4, 3001)
    bias = 0.01 * torch.randn(3001, device=device, dtype=dtype)
    check_against_reference(device, backend, dtype, approximate, x, bias)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("layout", ["transposed", "strided", "broadcast"])
def test_non_contiguous_and_broadcast_inputs(device, backend, layout):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    if layout == "transposed":
        x = torch.randn(77, 33, device=device).t()
    elif layout == "strided":
        x = torch.randn(12, 20, 3 * 31, device=device)[::3, ::5, ::3]
    else:  # stride 0 along the rows, as x.expand makes
        x = torch.randn(1, 100, device=device).expand(9, 100)
    assert not x.is_contiguous()
    bias = torch.randn(x.shape[-1], device=device)
    check_against_reference(device, backend, torch.float32, "none", x, bias)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", [(0, 16), (4, 0, 16), (3, 0)], ids=str)
def test_empty(device, backend, shape):
    skip_unless_runnable(device, backend)
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(shape[-1], device=device, requires_grad=True)
    with fasttx.use_backend(backend):
        y = fasttx.bias_gelu(x, bias)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(4099, 1537, device=device)
    bias = torch.randn(1537, device=device)
    grad = torch.randn_like(x)
    with fasttx.use_backend(backend):
        first = _run(lambda a, b: fasttx.bias_gelu(a, b), x, bias, grad)
        second = _run(lambda a, b: fasttx.bias_gelu(a, b), x, bias, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("approximate", APPROX)
def test_gradcheck_float64_cpu(approximate):
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    x = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=True)
    with fasttx.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: fasttx.bias_gelu(a, b, approximate), (x, bias))


def test_indices_past_2_31_cpu():
    """Rows x N > 2^31 elements: a 32-bit offset would wrap and write the wrong rows."""
    skip_unless_runnable("cpu", "cpu")
    skip_unless_free_memory(16)
    ext = backends.extension()
    n = 1024
    m = 2**31 // n + 3
    row = torch.randn(1, n, dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    x = row.expand(m, n).contiguous()
    y = ext.bias_gelu_fwd_cpu(x, bias, 0)
    expected = F.gelu(row.float() + bias.float()).to(torch.bfloat16)
    assert torch.allclose(y[-3:].float(), expected.float().expand(3, n), rtol=1e-2, atol=1e-2)
    assert torch.equal(y[-1], y[0])
    del y
    grad_x, grad_bias = ext.bias_gelu_bwd_cpu(torch.ones_like(x), x, bias, 0)
    g_row = torch.ops.aten.gelu_backward(torch.ones(1, n), row.float() + bias.float())
    assert torch.allclose(grad_x[-3:].float(), g_row.expand(3, n), rtol=1e-2, atol=1e-2)
    assert torch.allclose(grad_bias.float(), m * g_row[0], rtol=2e-2, atol=1e-2 * m)


# ---- bad input -------------------------------------------------------------------

def test_bias_of_wrong_size_names_both_shapes():
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*\(4, 8\).*got \(7,\)"):
        fasttx.bias_gelu(torch.randn(4, 8), torch.randn(7))


def test_integer_dtype_is_rejected():
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        fasttx.bias_gelu(torch.ones(4, 8, dtype=torch.int64), torch.ones(8, dtype=torch.int64))


def test_mismatched_dtypes_are_rejected():
    with pytest.raises(TypeError, match="bias has dtype torch.float16 but x has torch.float32"):
        fasttx.bias_gelu(torch.randn(4, 8), torch.randn(8, dtype=torch.float16))


def test_mismatched_devices_are_rejected():
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        fasttx.bias_gelu(torch.randn(4, 8), torch.randn(8, device="meta"))


def test_unknown_approximation_is_rejected():
    with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh'\), got 'fast'"):
        fasttx.bias_gelu(torch.randn(4, 8), torch.randn(8), approximate="fast")


def test_non_tensor_is_rejected():
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got list"):
        fasttx.bias_gelu(torch.randn(4, 8), [0.0] * 8)


# ---- torch.library and torch.compile ------------------------------------------------

def test_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    x = torch.randn(6, 33, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    for approximate in APPROX:
        torch.library.opcheck(torch.ops.fasttx.bias_gelu.default, (x, bias, approximate, "auto"))


def test_torch_compile_fullgraph_matches_eager():
    def block(x, bias):
        return fasttx.bias_gelu(x * 2, bias, "tanh").sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # raises on any graph break
    x = torch.randn(5, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    out = compiled(x, bias)
    out.sum().backward()
    grads = (x.grad, bias.grad)
    x.grad = bias.grad = None
    expected = block(x, bias)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, (x.grad, bias.grad))


def test_auto_prefers_the_cpu_kernel_on_cpu_tensors():
    skip_unless_runnable("cpu", "cpu")
    x, bias = torch.randn(2, 8), torch.randn(8)
    assert backends.choose("bias_gelu", IMPLEMENTATIONS, "auto", x, bias).backend == "cpu"
