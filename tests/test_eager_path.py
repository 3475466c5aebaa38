"""The eager fast path (fasttx/ops/_eager.py) and the registered custom ops compute the same thing,
and every kind of tracing is sent to the registered ops."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import fasttx
from fasttx.ops._eager import plain_eager

from backend_params import skip_unless_runnable


def _leaves(*shapes):
    torch.manual_seed(0)
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]


# op name -> (leaves, fasttx call, the same through the registered custom op)
def _cases():
    x, r, w, b = _leaves((6, 33), (6, 33), (33,), (33,))
    w1, b1, w2, b2 = _leaves((40, 33), (40,), (33, 40), (33,))
    w1u = (0.5 * w1 + 0.1).detach().requires_grad_()  # _leaves reseeds: not a copy of w1
    q, k, v = _leaves((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16))
    scores = _leaves((2, 3, 9, 11))[0]
    no_seed = torch.zeros((), dtype=torch.int64)
    ops = torch.ops.fasttx
    return {
        "bias_gelu": ((x, b), lambda: fasttx.bias_gelu(x, b, "tanh"),
                      lambda: ops.bias_gelu(x, b, "tanh", "cpu")),
        "layer_norm": ((x, w, b), lambda: fasttx.layer_norm(x, 33, w, b),
                       lambda: ops.norm_forward(x, None, w, b, 1e-5, False, "cpu")[0]),
        "add_layer_norm": ((x, r, w, b), lambda: sum(fasttx.add_layer_norm(x, r, 33, w, b)),
                           lambda: sum(ops.norm_forward(x, r, w, b, 1e-5, False, "cpu")[:2])),
        "rms_norm": ((x, w), lambda: fasttx.rms_norm(x, 33, w, 1e-6),
                     lambda: ops.norm_forward(x, None, w, None, 1e-6, True, "cpu")[0]),
        "add_rms_norm": ((x, r, w), lambda: sum(fasttx.add_rms_norm(x, r, 33, w, 1e-6)),
                         lambda: sum(ops.norm_forward(x, r, w, None, 1e-6, True, "cpu")[:2])),
        "gelu_ffn": ((x, w1, b1, w2, b2), lambda: fasttx.gelu_ffn(x, w1, b1, w2, b2, "relu"),
                     lambda: ops.gelu_ffn_forward(x, w1, b1, w2, b2, "relu", "cpu")[0]),
        "attention": ((q, k, v), lambda: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      lambda: ops.attention_forward(q, k, v, None, True, 0.25, 0.0, no_seed, "cpu")[0]),
        "softmax": ((scores,), lambda: fasttx.softmax(scores, 0.5, is_causal=True),
                    lambda: ops.softmax_forward(scores, 0.5, None, True, "cpu")),
        "glu": ((x, r), lambda: fasttx.glu(x, r, "silu"), lambda: ops.glu(x, r, "silu", "cpu")),
        "glu_ffn": ((x, w1, w1u, w2, b1), lambda: fasttx.glu_ffn(x, w1, w1u, w2, "gelu", b1, None, b2),
                    lambda: ops.glu_ffn_forward(x, w1, b1, w1u, None, w2, b2, "gelu", "cpu")[0]),
    }


@pytest.mark.parametrize("op", ["bias_gelu", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "gelu_ffn",
                                "attention", "softmax", "glu", "glu_ffn"])
def test_eager_path_equals_the_custom_op_bitwise(op):
    skip_unless_runnable("cpu", "cpu")
    leaves, eager_call, op_call = _cases()[op]
    results = []
    for call in (eager_call, op_call):
        with fasttx.use_backend("cpu"):
            out = call()
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_plain_tensors_take_the_eager_path():
    assert plain_eager(torch.ones(2), None, torch.ones(3))


def test_module_parameters_take_the_eager_path():
    # A module's weights are nn.Parameters: they must not send every call through the dispatcher.
    ffn = fasttx.nn.GELUFFN(8, 16)
    assert plain_eager(torch.ones(2, 8), ffn.fc1.weight, ffn.fc1.bias)
    x = torch.randn(3, 8, requires_grad=True)
    y = ffn(x)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_GeluFFNFunctionBackward"  # under the output view
    y.sum().backward()
    assert x.grad is not None and ffn.fc1.weight.grad is not None


def test_fake_tensors_and_modes_take_the_custom_op():
    with FakeTensorMode() as mode:
        fake = torch.empty(4, 8)
        assert not plain_eager(fake)
        y = fasttx.layer_norm(fake, 8)  # served by the fake implementation
        assert y.shape == (4, 8)
    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    t = torch.ones(2)
    with PassThrough():
        assert not plain_eager(t)


def test_functorch_transforms_take_the_custom_op():
    seen = []
    torch.func.grad(lambda t: (seen.append(plain_eager(t)), t.sum())[1])(torch.ones(3))
    assert seen == [False]


# ---- the norms' C++ fast path (csrc/cpu/layer_norm_eager.cpp) ---------------------------------------

def _norm_eager_cpu():
    skip_unless_runnable("cpu", "cpu")
    from fasttx import backends
    return backends.extension().norm_eager_cpu


def test_norm_fast_path_serves_plain_cpu_calls_with_parameters():
    norm_eager_cpu = _norm_eager_cpu()
    x = torch.randn(3, 5, 8, requires_grad=True)
    weight, bias = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    out = norm_eager_cpu(x, None, (8,), weight, bias, 1e-5, False)
    assert out is not None and out[1] is None and out[0].shape == x.shape
    out[0].sum().backward()
    assert x.grad is not None and weight.grad is not None and bias.grad is not None
    with torch.no_grad():
        y, s = norm_eager_cpu(x, x, (5, 8), None, None, 1e-5, False)
    assert y.shape == s.shape == x.shape and not y.requires_grad


@pytest.mark.parametrize("case", ["wrong weight shape", "weight dtype", "integer x", "empty", "bad suffix",
                                  "residual shape", "rms with bias"])
def test_norm_fast_path_leaves_everything_else_to_python(case):
    norm_eager_cpu = _norm_eager_cpu()
    x, w = torch.randn(4, 8), torch.randn(8)
    args = {"wrong weight shape": (x, None, (8,), torch.randn(7), None, False),
            "weight dtype": (x, None, (8,), w.double(), None, False),
            "integer x": (x.long(), None, (8,), None, None, False),
            "empty": (x[:0], None, (8,), w, None, False),
            "bad suffix": (x, None, (4,), None, None, False),
            "residual shape": (x, x[:2], (8,), w, None, False),
            "rms with bias": (x, None, (8,), w, w, True)}[case]
    assert norm_eager_cpu(*args[:5], 1e-5, args[5]) is None


def test_norm_fast_path_declines_modes_and_transforms():
    norm_eager_cpu = _norm_eager_cpu()
    seen = []
    call = lambda t: (seen.append(norm_eager_cpu(t, None, (3,), None, None, 1e-5, False)), t.sum())[1]
    torch.func.grad(call)(torch.randn(2, 3))
    torch.vmap(call)(torch.randn(4, 2, 3))
    with FakeTensorMode():
        call(torch.empty(2, 3))
    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        call(torch.randn(2, 3))
    assert seen == [None] * 4
    assert call(torch.randn(2, 3)) is not None and seen[-1] is not None  # and outside them all, it serves


def test_norm_fast_path_makes_autocasts_casts():
    """Under autocast a bf16 branch meets an fp32 residual in fp32 and the parameters follow x, as on the
    Python path (fasttx/ops/_autocast.py); the fast path serves it with the same casts and gradients."""
    norm_eager_cpu = _norm_eager_cpu()
    x = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    g = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = norm_eager_cpu(x, r, (8,), w, b, 1e-5, False)
    assert fast is not None and fast[0].dtype == fast[1].dtype == torch.float32
    fast_grads = torch.autograd.grad((fast[0] * g).sum() + fast[1].sum(), (x, r, w, b))
    y, s = fasttx.add_layer_norm(x.float(), r, 8, w.float(), b)
    assert torch.equal(fast[0], y) and torch.equal(fast[1], s)
    grads = torch.autograd.grad((y * g).sum() + s.sum(), (x, r, w, b))
    for name, a, e in zip("x r weight bias".split(), fast_grads, grads):
        assert a.dtype == e.dtype and torch.equal(a, e), name
    # outside autocast, mixed dtypes go to the Python path, which raises
    assert norm_eager_cpu(x, r, (8,), None, None, 1e-5, False) is None


def test_norm_fast_path_gives_second_derivatives():
    """With create_graph=True the C++ node's backward runs in ATen ops that autograd records; before,
    a gradient penalty on loss.sum() got constants and silently lost its term. Every op and path:
    tests/test_double_backward.py."""
    norm_eager_cpu = _norm_eager_cpu()
    x, r, w, b = _leaves((5, 8), (5, 8), (8,), (8,))
    for rms in (False, True):
        y, s = norm_eager_cpu(x, r, (8,), w, None if rms else b, 1e-5, rms)
        assert "NormFunction" in y.grad_fn.name()  # the C++ node
        norm = torch.nn.functional.rms_norm if rms else torch.nn.functional.layer_norm
        expected_y = norm(x + r, (8,), w, *(() if rms else (b,)), 1e-5)
        leaves = (x, r, w) if rms else (x, r, w, b)
        penalties = []
        for out, total in ((y, s), (expected_y, x + r)):
            loss = out.sum() + (total * total.detach()).sum()  # gradients that do not require grad
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            penalties.append(torch.autograd.grad(sum(g.square().sum() for g in grads), (x, r, w)))  # not b: constant
        for a, e in zip(*penalties):
            torch.testing.assert_close(a, e)


def test_norm_fast_path_second_derivative_under_autocast_mixed_dtypes():
    """A bf16 branch beside an fp32 residual (the kernel writes x's gradient in bf16): the recorded
    backward gives x's gradient in bf16 too, and its second derivative that of the fp32 sum."""
    norm_eager_cpu = _norm_eager_cpu()
    x = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    r, w, b = (torch.randn(*s, requires_grad=True) for s in ((5, 8), (8,), (8,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = norm_eager_cpu(x, r, (8,), w, b, 1e-5, False)
    penalties = []
    for out in (y, torch.nn.functional.layer_norm(x.float() + r, (8,), w, b, 1e-5)):
        grads = torch.autograd.grad(out.sum(), (x, r, w), create_graph=True)
        assert grads[0].dtype == torch.bfloat16
        penalties.append(torch.autograd.grad(sum(g.float().square().sum() for g in grads), (x, r, w)))
    for a, e in zip(*penalties):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)


def test_norm_fast_path_over_several_trailing_dims_matches_torch():
    _norm_eager_cpu()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)  # rows of 32: one row, the whole of x
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    ours, theirs = fasttx.layer_norm(x, (4, 8), w), torch.nn.functional.layer_norm(x, (4, 8), w)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), (x, w)), torch.autograd.grad(theirs.sum(), (x, w)))
