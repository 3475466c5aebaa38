"""Every op runs on tensors without data: meta tensors and FakeTensorMode (what torch.export and
torch.compile trace with) give the output's shape and dtype, forward and backward, and never read a
value. cross_entropy's target check used to call .item() on a fake tensor
(DataDependentOutputException).
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fasttx
from fasttx.ops.linear import linear


def _calls(device):
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    q = torch.randn(1, 2, 4, 8, device=device, requires_grad=True)
    logits = torch.randn(4, 5, device=device, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2], device=device)
    w1 = torch.randn(16, 8, device=device, requires_grad=True)
    w2 = torch.randn(8, 16, device=device, requires_grad=True)
    return {
        "layer_norm": (lambda: fasttx.layer_norm(x, 8, w, w), (2, 3, 8), torch.float32),
        "layer_norm_bf16_input": (lambda: fasttx.layer_norm(x.bfloat16(), 8, w, w), (2, 3, 8), torch.bfloat16),
        "add_layer_norm": (lambda: fasttx.add_layer_norm(x, x, 8, w, w)[0], (2, 3, 8), torch.float32),
        "rms_norm": (lambda: fasttx.rms_norm(x, 8, w), (2, 3, 8), torch.float32),
        "add_rms_norm": (lambda: sum(fasttx.add_rms_norm(x, x * 2, 8, w)), (2, 3, 8), torch.float32),
        "bias_gelu": (lambda: fasttx.bias_gelu(x, w), (2, 3, 8), torch.float32),
        "softmax": (lambda: fasttx.softmax(q, is_causal=True), (1, 2, 4, 8), torch.float32),
        "gelu_ffn": (lambda: fasttx.gelu_ffn(x, w1, None, w2, None), (2, 3, 8), torch.float32),
        "cross_entropy": (lambda: fasttx.cross_entropy(logits, target), (), torch.float32),
        "cross_entropy_none": (lambda: fasttx.cross_entropy(logits, target, reduction="none"), (4,), torch.float32),
        "scaled_dot_product_attention": (lambda: fasttx.scaled_dot_product_attention(q, q, q, is_causal=True),
                                         (1, 2, 4, 8), torch.float32),
        "linear": (lambda: linear(x, w1), (2, 3, 16), torch.float32),
        "glu": (lambda: fasttx.glu(x, x * 2), (2, 3, 8), torch.float32),
        "glu_ffn": (lambda: fasttx.glu_ffn(x, w1, w1, w2), (2, 3, 8), torch.float32),
    }


NAMES = list(_calls("meta"))


def _run(name, device):
    fn, shape, dtype = _calls(device)[name]
    out = fn()
    assert out.shape == shape and out.dtype == dtype
    out.float().sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_meta_tensors(name):
    _run(name, "meta")


@pytest.mark.parametrize("name", NAMES)
def test_fake_tensor_mode(name):
    with FakeTensorMode():
        _run(name, "cpu")
