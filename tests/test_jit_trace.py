"""torch.jit.trace records fasttx's registered ops, so a traced module computes what the module does.

The norms' eager CPU path once ran its kernel out of the tracer's sight, which recorded only the
output's allocation (aten::empty): the traced module returned uninitialised memory. Every op and
module is traced here, run on new inputs of the same shape, and compared with the eager call, in
the forward and the backward; the graph must hold the fasttx op and no bare allocation.
"""
import io

import pytest
import torch

import fasttx
from fasttx.models import GPT, GPTConfig
from fasttx.ops.linear import linear

from backend_params import skip_unless_runnable


def _op_cases():
    """name -> (function of tensors, a maker of its float inputs, the fasttx:: op the trace must hold)."""
    target = torch.tensor([2, -100, 0, 6, 3])
    keep = torch.rand(3, 9, 11) > 0.3
    f = lambda *shapes: lambda: [torch.randn(*s) for s in shapes]
    return {
        "layer_norm": (lambda x, w, b: fasttx.layer_norm(x, 33, w, b), f((2, 3, 33), (33,), (33,)), "norm_forward"),
        "add_layer_norm": (lambda x, r, w, b: fasttx.add_layer_norm(x, r, 33, w, b), f((6, 33), (6, 33), (33,), (33,)),
                           "norm_forward"),
        "rms_norm": (lambda x, w: fasttx.rms_norm(x, 33, w), f((6, 33), (33,)), "norm_forward"),
        "add_rms_norm": (lambda x, r, w: fasttx.add_rms_norm(x, r, 33, w), f((2, 3, 33), (2, 3, 33), (33,)),
                         "norm_forward"),
        "bias_gelu": (lambda x, b: fasttx.bias_gelu(x, b, "tanh"), f((4, 5, 33), (33,)), "bias_gelu"),
        "softmax": (lambda s: fasttx.softmax(s, 0.5, keep), f((2, 3, 9, 11)), "softmax_forward"),
        "cross_entropy": (lambda x: fasttx.cross_entropy(x, target), f((5, 7)), "cross_entropy_forward"),
        "gelu_ffn": (lambda x, w1, b1, w2, b2: fasttx.gelu_ffn(x, w1, b1, w2, b2),
                     f((2, 3, 8), (16, 8), (16,), (8, 16), (8,)), "gelu_ffn_forward"),
        "attention": (lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      f((2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16)), "attention_forward"),
        "linear": (linear, f((2, 3, 8), (5, 8), (5,)), None),  # F.linear's own aten op under tracing
    }


def _kinds(traced):
    return [node.kind() for node in traced.inlined_graph.nodes()]


def _assert_records(traced, fasttx_ops):
    kinds = _kinds(traced)
    for op in fasttx_ops:
        assert f"fasttx::{op}" in kinds, f"the trace has no fasttx::{op}: {sorted(set(kinds))}"
    assert "aten::empty" not in kinds and "prim::PythonOp" not in kinds, sorted(set(kinds))


def _grads(out, inputs):
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(2)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])


def _assert_same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("op", list(_op_cases()))
def test_traced_op_computes_the_op(op, backend):
    skip_unless_runnable("cpu", "cpu" if backend == "auto" else backend)
    call, make, recorded = _op_cases()[op]
    torch.manual_seed(0)
    with fasttx.use_backend(backend):
        traced = torch.jit.trace(call, tuple(make()))
        _assert_records(traced, [recorded] if recorded else [])
        inputs = [t.requires_grad_() for t in make()]  # new values, the same shapes
        out, expected = traced(*inputs), call(*inputs)
        _assert_same(out, expected)
        _assert_same(_grads(out, inputs), _grads(expected, inputs))


class _GPTLogitsAndLoss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model(idx, targets)


def _module_cases():
    """name -> (module, a maker of its inputs, the fasttx:: ops the trace must hold)."""
    torch.manual_seed(0)
    x = lambda: (torch.randn(2, 5, 16),)
    norm, ffn, attn = ["norm_forward"], ["gelu_ffn_forward"], ["attention_forward"]
    patched_layer = torch.nn.TransformerEncoderLayer(16, 4, 32, 0.0, "gelu", batch_first=True, norm_first=True)
    fasttx.patch(patched_layer)
    patched_norm = torch.nn.LayerNorm(16)
    fasttx.patch(patched_norm)
    gpt = _GPTLogitsAndLoss(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=16)))
    tokens = lambda: (torch.randint(0, 11, (2, 7)), torch.randint(0, 11, (2, 7)))
    return {
        "LayerNorm": (fasttx.nn.LayerNorm(16), x, norm),
        "RMSNorm": (fasttx.nn.RMSNorm(16), x, norm),
        "GELUFFN": (fasttx.nn.GELUFFN(16, 32), x, ffn),
        "MultiheadSelfAttention": (fasttx.nn.MultiheadSelfAttention(16, 4, is_causal=True), x, attn),
        "TransformerBlock_pre_ln": (fasttx.nn.TransformerBlock(16, 4, 32, is_causal=True), x, norm + ffn + attn),
        "TransformerBlock_post_ln": (fasttx.nn.TransformerBlock(16, 4, 32, norm_first=False), x, norm + ffn + attn),
        "patched nn.LayerNorm": (patched_norm, x, norm),
        "patched nn.TransformerEncoderLayer": (patched_layer, x, norm + ffn + attn),
        "GPT": (gpt, tokens, norm + ffn + attn + ["cross_entropy_forward"]),
    }


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(_module_cases()))
def test_traced_module_computes_the_module(name, training):
    skip_unless_runnable("cpu", "cpu")
    module, make, recorded = _module_cases()[name]
    module.train(training)
    traced = torch.jit.trace(module, make())
    _assert_records(traced, recorded)
    inputs = make()
    out, expected = traced(*inputs), module(*inputs)
    _assert_same(out, expected)
    if inputs[0].is_floating_point():
        inputs[0].requires_grad_()
    params = list(module.parameters())
    _assert_same(_grads(traced(*inputs), [*inputs, *params]), _grads(module(*inputs), [*inputs, *params]))


def test_traced_module_survives_save_and_load():
    skip_unless_runnable("cpu", "cpu")
    block = fasttx.nn.TransformerBlock(16, 4, 32, is_causal=True)
    x = torch.randn(2, 5, 16)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(block, (x,)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    _assert_records(loaded, ["norm_forward", "gelu_ffn_forward", "attention_forward"])
    x2 = torch.randn(2, 5, 16)
    _assert_same(loaded(x2), block(x2))
