"""layer_norm, add_layer_norm, rms_norm and add_rms_norm against PyTorch, in every backend, plus the nn modules."""
import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx import backends

from backend_params import device_backend_params as all_device_backend_params
from backend_params import skip_unless_free_memory, skip_unless_runnable
from norm_cases import RMS_EPS, fasttx_fn, run, torch_fn  # noqa: F401
from tolerance import assert_within_torch_error

def device_backend_params():
    return all_device_backend_params()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 768, 1000, 1537, 4096, 8192]
OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]


_fasttx = lambda op, affine=True: fasttx_fn(op)
_torch, _run = torch_fn, run


def check_against_reference(device, backend, op, x, affine=True, residual_needed=None):
    dtype, n = x.dtype, x.shape[-1]
    r = torch.randn_like(x) if op.startswith("add_") else None
    w = 1 + 0.5 * torch.randn(n, device=device, dtype=dtype) if affine else None
    b = 0.5 * torch.randn(n, device=device, dtype=dtype) if affine and "rms" not in op else None
    grads = [torch.randn(x.shape, device=device, dtype=dtype) for _ in range(2)]
    with fasttx.use_backend(backend):
        outs, in_grads = _run(_fasttx(op, affine), [x, r, w, b], grads)
    truth_outs, truth_grads = _run(_torch(op), [x, r, w, b], grads, cast=torch.float64)
    torch_outs, torch_grads = _run(_torch(op), [x, r, w, b], grads)
    for i, (o, t, p) in enumerate(zip(outs, truth_outs, torch_outs)):
        assert_within_torch_error(o, t, p, factor=2, what=f"{op} {backend} {dtype} output {i}")
    for name, o, t, p in zip("x residual weight bias".split(), in_grads, truth_grads, torch_grads):
        if t is not None:
            assert_within_torch_error(o, t, p, factor=3, what=f"{op} {backend} {dtype} grad {name}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_matches_reference(device, backend, op, dtype, n):
    skip_unless_runnable(device, backend)
    torch.manual_seed(n)
    x = torch.randn((3, n) if n >= 4096 else (2, 5, n), device=device, dtype=dtype)
    check_against_reference(device, backend, op, x)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["rank1", "rank4", "no_affine", "transposed", "strided", "broadcast", "large_mean"])
def test_layouts_and_awkward_inputs(device, backend, op, layout):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    make = {
        "rank1": lambda: torch.randn(77, device=device),
        "rank4": lambda: torch.randn(2, 3, 4, 77, device=device),
        "no_affine": lambda: torch.randn(9, 77, device=device),
        "transposed": lambda: torch.randn(77, 33, device=device).t(),
        "strided": lambda: torch.randn(12, 20, 3 * 31, device=device)[::3, ::5, ::3],
        "broadcast": lambda: torch.randn(1, 100, device=device).expand(9, 100),
        # |mean| >> std: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance
        "large_mean": lambda: 1e4 + torch.randn(5, 1000, device=device),
    }
    check_against_reference(device, backend, op, make[layout](), affine=layout != "no_affine")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("rows", [5, 0])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bias_without_weight(device, backend, op, rows, compiled):
    """F.layer_norm(x, shape, None, bias): the torch backend's backward and fake once assumed a weight."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(rows, 33, device=device)
    r = torch.randn_like(x) if op == "add_layer_norm" else None
    b = torch.randn(33, device=device)
    grads = [torch.randn_like(x) for _ in range(2)]
    fn = _fasttx(op)
    if compiled:
        torch._dynamo.reset()  # the lambda's cache holds an entry per device and backend: past 8, fullgraph fails
        fn = torch.compile(fn, fullgraph=True)
    with fasttx.use_backend(backend):
        outs, in_grads = _run(fn, [x, r, None, b], grads)
    truth_outs, truth_grads = _run(_torch(op), [x, r, None, b], grads, cast=torch.float64)
    torch_outs, torch_grads = _run(_torch(op), [x, r, None, b], grads)
    for o, t, p in zip(outs, truth_outs, torch_outs):
        assert_within_torch_error(o, t, p, factor=2, what=f"{op} {backend} output")
    for name, o, t, p in zip("x residual weight bias".split(), in_grads, truth_grads, torch_grads):
        if t is not None:
            assert o is not None and o.dtype == p.dtype, name
            assert_within_torch_error(o, t, p, factor=3, what=f"{op} {backend} grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps_is_the_dtype_epsilon(dtype):
    x = torch.randn(4, 1, dtype=dtype)  # N = 1: the eps term dominates mean(x^2) for small x
    torch.testing.assert_close(fasttx.rms_norm(x * 1e-2, 1), F.rms_norm(x * 1e-2, (1,)))
    r = torch.randn(4, 1, dtype=dtype) * 1e-2
    torch.testing.assert_close(fasttx.add_rms_norm(x * 1e-2, r, 1), fasttx.ops.add_rms_norm_ref(x * 1e-2, r, (1,)))


def test_normalized_shape_spanning_several_dims():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10, requires_grad=True)
    w = torch.randn(6, 10, requires_grad=True)
    b = torch.randn(6, 10, requires_grad=True)
    y = fasttx.layer_norm(x, (6, 10), w, b)
    torch.testing.assert_close(y, F.layer_norm(x, (6, 10), w, b))
    torch.testing.assert_close(fasttx.rms_norm(x, [6, 10], w), F.rms_norm(x, [6, 10], w))
    r = torch.randn(4, 6, 10)
    torch.testing.assert_close(fasttx.add_rms_norm(x, r, [6, 10], w), fasttx.ops.add_rms_norm_ref(x, r, (6, 10), w))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 16), (4, 0, 16), (3, 0)], ids=str)
def test_empty(device, backend, op, shape):
    skip_unless_runnable(device, backend)
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(shape[-1], device=device, requires_grad=True)
    with fasttx.use_backend(backend):
        outs = _fasttx(op, True)(x, torch.zeros_like(x), w, None)
    expected = _torch(op)(x, torch.zeros_like(x), w, None)
    for o, e in zip(outs, expected):
        assert o.shape == e.shape
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(device, backend, op):
    skip_unless_runnable(device, backend)
    torch.manual_seed(0)
    x = torch.randn(4099, 1537, device=device)
    r, w, b = torch.randn_like(x), torch.randn(1537, device=device), torch.randn(1537, device=device)
    grads = [torch.randn_like(x), torch.randn_like(x)]
    with fasttx.use_backend(backend):
        first = _run(_fasttx(op, True), [x, r, w, b], grads)
        second = _run(_fasttx(op, True), [x, r, w, b], grads)
    for a, c in zip(first[0] + first[1], second[0] + second[1]):
        assert (a is None and c is None) or torch.equal(a, c)


def _with_out_dtype(op, out_dtype):
    """The op with out_dtype, and the same op followed by .to(out_dtype): what out_dtype promises to equal."""
    def call(x, r, w, b, **kw):
        if op == "layer_norm":
            return (fasttx.layer_norm(x, x.shape[-1:], w, b, **kw),)
        if op == "add_layer_norm":
            return fasttx.add_layer_norm(x, r, x.shape[-1:], w, b, **kw)
        if op == "add_rms_norm":
            return fasttx.add_rms_norm(x, r, x.shape[-1:], w, RMS_EPS, **kw)
        return (fasttx.rms_norm(x, x.shape[-1:], w, RMS_EPS, **kw),)
    fused = lambda *a: call(*a, out_dtype=out_dtype)
    cast = lambda *a: (lambda outs: (outs[0].to(out_dtype),) + tuple(outs[1:]))(call(*a))
    return fused, cast


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 77, 1537])
def test_out_dtype_is_one_rounding_of_the_output(device, backend, op, out_dtype, n):
    """y in out_dtype equals y.to(out_dtype) bit for bit; its gradient arrives in out_dtype and gives
    the input gradients that the cast's would (fp32 sums, so within a few ulp)."""
    skip_unless_runnable(device, backend)
    torch.manual_seed(n)
    x = torch.randn(2, 5, n, device=device)
    r, w, b = torch.randn_like(x), 1 + torch.randn(n, device=device), torch.randn(n, device=device)
    grads = [torch.randn(x.shape, device=device).to(out_dtype), torch.randn_like(x)]
    fused, cast = _with_out_dtype(op, out_dtype)
    with fasttx.use_backend(backend):
        (outs, in_grads), (want, want_grads) = _run(fused, [x, r, w, b], grads), _run(cast, [x, r, w, b], grads)
    assert outs[0].dtype == out_dtype and all(o.dtype == torch.float32 for o in outs[1:])
    for o, e in zip(outs, want):
        assert torch.equal(o, e)
    for name, g, e in zip("x residual weight bias".split(), in_grads, want_grads):
        if e is not None:
            # The two kernel instantiations may contract a - b * c into an FMA differently: ulp-level
            # noise, which rstd = 1/sqrt(eps) amplifies at n = 1, where the true gradient is 0.
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 if n > 1 else 1e-3, msg=f"{op} grad {name}")


def test_out_dtype_must_be_a_floating_dtype():
    with pytest.raises(TypeError, match="out_dtype must be None or a floating torch.dtype, got torch.int32"):
        fasttx.layer_norm(torch.randn(4, 8), 8, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype must be None or a floating torch.dtype, got 'bf16'"):
        fasttx.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8), 8, out_dtype="bf16")
    with pytest.raises(TypeError, match="add_rms_norm: out_dtype must be None or a floating torch.dtype, got 'bf16'"):
        fasttx.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8), 8, out_dtype="bf16")


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64_cpu(op):
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    x, r = torch.randn(5, 37, dtype=torch.float64), torch.randn(5, 37, dtype=torch.float64)
    w, b = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, r, w, b)]
    fn = _fasttx(op, True)
    with fasttx.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, r, w, b: fn(x, r, w, b if "rms" not in op else None), inputs)


def test_indices_past_2_31_cpu():
    """rows x N > 2^31 elements: a 32-bit offset would wrap into the wrong rows."""
    skip_unless_runnable("cpu", "cpu")
    skip_unless_free_memory(16)
    ext = backends.extension()
    n = 4096
    m = 2**31 // n + 3
    row = torch.randn(1, n, dtype=torch.bfloat16)
    w = torch.randn(n, dtype=torch.bfloat16)
    x = row.expand(m, n).contiguous()
    y, _, mean, rstd = ext.layer_norm_fwd_cpu(x, None, w, None, 1e-5, False)
    expected = F.layer_norm(row.float(), (n,), w.float())
    torch.testing.assert_close(y[-3:].float(), expected.expand(3, n), rtol=2e-2, atol=2e-2)
    del y
    grad_input, grad_weight, _ = ext.layer_norm_bwd_cpu(x, None, x, mean, rstd, w, False, False)
    assert torch.equal(grad_input[-1], grad_input[0])


# ---- modules -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_module_is_a_drop_in(kwargs):
    torch.manual_seed(0)
    ours, theirs = fasttx.nn.LayerNorm((4, 8), **kwargs), torch.nn.LayerNorm((4, 8), **kwargs)
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"eps": 1e-6}])
def test_rms_norm_module_is_a_drop_in(kwargs):
    ours, theirs = fasttx.nn.RMSNorm(8, **kwargs), torch.nn.RMSNorm(8, **kwargs)
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_modules_take_device_and_dtype():
    m = fasttx.nn.LayerNorm(8, device="meta", dtype=torch.bfloat16)
    assert m.weight.device.type == "meta" and m.weight.dtype == torch.bfloat16


# ---- bad input -------------------------------------------------------------------

def test_normalized_shape_must_match_the_trailing_dims():
    with pytest.raises(ValueError, match=r"normalized_shape \(5,\) must be a non-empty suffix .*\(4, 8\)"):
        fasttx.layer_norm(torch.randn(4, 8), (5,))


def test_weight_of_wrong_shape_names_it():
    with pytest.raises(ValueError, match=r"weight must have shape normalized_shape = \(8,\), got \(7,\)"):
        fasttx.rms_norm(torch.randn(4, 8), 8, torch.randn(7))


@pytest.mark.parametrize("op", [fasttx.add_layer_norm, fasttx.add_rms_norm], ids=lambda f: f.__name__)
def test_residual_of_wrong_shape_names_it(op):
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(4, 8\), got \(1, 8\)"):
        op(torch.randn(4, 8), torch.randn(1, 8), 8)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int32"):
        fasttx.layer_norm(torch.ones(4, 8, dtype=torch.int32), 8)


def test_mismatched_weight_device_is_rejected():
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fasttx.layer_norm(torch.randn(4, 8), 8, torch.randn(8, device="meta"))


# ---- torch.library and torch.compile ------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_forced_gpu_backend_on_cpu_tensors_raises_and_says_why(backend, op):
    if backends.triton_interpreting():
        pytest.skip("under the interpreter triton takes CPU tensors")
    x = torch.randn(2, 8)
    with fasttx.use_backend(backend), \
            pytest.raises(fasttx.BackendUnavailableError, match=f"fasttx.{op}: backend '{backend}' was forced"):
        _fasttx(op)(x, torch.randn_like(x), None, None)


def test_opcheck():
    x = torch.randn(6, 33, requires_grad=True)
    r = torch.randn(6, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    for args in [(x, None, w, b, 1e-5, False), (x, r, w, b, 1e-5, False), (x, None, w, None, 1e-6, True),
                 (x, r, w, None, 1e-6, True), (x, None, None, None, 1e-5, False)]:
        torch.library.opcheck(torch.ops.fasttx.norm_forward.default, args + ("auto",))


@pytest.mark.parametrize("add_norm", ["add_layer_norm", "add_rms_norm"])
def test_torch_compile_fullgraph_matches_eager(add_norm):
    def block(x, r, w, b):
        if add_norm == "add_layer_norm":
            y, s = fasttx.add_layer_norm(x, r, 64, w, b)
        else:
            y, s = fasttx.add_rms_norm(x, r, 64, w)
            y = y + b
        return (fasttx.rms_norm(y, 64, w) + s).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    inputs = [torch.randn(5, 64, requires_grad=True), torch.randn(5, 64, requires_grad=True),
              torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)]
    out = compiled(*inputs)
    out.sum().backward()
    grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    expected = block(*inputs)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, [t.grad for t in inputs])
