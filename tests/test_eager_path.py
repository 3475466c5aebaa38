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
        "gelu_ffn": ((x, w1, b1, w2, b2), lambda: fasttx.gelu_ffn(x, w1, b1, w2, b2, "relu"),
                     lambda: ops.gelu_ffn_forward(x, w1, b1, w2, b2, "relu", "cpu")[0]),
        "attention": ((q, k, v), lambda: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      lambda: ops.attention_forward(q, k, v, None, True, 0.25, 0.0, no_seed, "cpu")[0]),
        "softmax": ((scores,), lambda: fasttx.softmax(scores, 0.5, is_causal=True),
                    lambda: ops.softmax_forward(scores, 0.5, None, True, "cpu")),
    }


@pytest.mark.parametrize("op", ["bias_gelu", "layer_norm", "add_layer_norm", "rms_norm", "gelu_ffn", "attention",
                                "softmax"])
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
