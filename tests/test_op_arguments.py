"""Every public op refuses a bad argument with a TypeError (wrong type) or ValueError (wrong value)
that says fasttx, names the argument and shows what came: never a bare traceback from deep inside
(``layer_norm(x, 64.0)`` used to end in "'float' object is not iterable", ``eps=None`` in float()).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import fasttx
from fasttx.ops.linear import linear

X = torch.randn(2, 3, 8)
W, B = torch.randn(8), torch.randn(8)
LOGITS, TARGET = torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
Q = torch.randn(1, 2, 4, 8)
W1, B1, W2, B2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)


def _layer_norm(**kw):
    args = dict(x=X, normalized_shape=8, weight=W, bias=B, eps=1e-5) | kw
    return lambda: fasttx.layer_norm(**args)


def _add_layer_norm(**kw):
    args = dict(x=X, residual=X, normalized_shape=8, weight=W, bias=B, eps=1e-5) | kw
    return lambda: fasttx.add_layer_norm(**args)


def _add_rms_norm(**kw):
    args = dict(x=X, residual=X, normalized_shape=8, weight=W, eps=None) | kw
    return lambda: fasttx.add_rms_norm(**args)


def _rms_norm(**kw):
    args = dict(x=X, normalized_shape=8, weight=W, eps=None) | kw
    return lambda: fasttx.rms_norm(**args)


def _bias_gelu(**kw):
    args = dict(x=X, bias=B, approximate="none") | kw
    return lambda: fasttx.bias_gelu(**args)


def _softmax(**kw):
    args = dict(x=X, scale=1.0, attn_mask=None, is_causal=False) | kw
    return lambda: fasttx.softmax(**args)


def _gelu_ffn(**kw):
    args = dict(x=X, w1=W1, b1=B1, w2=W2, b2=B2, activation="gelu") | kw
    return lambda: fasttx.gelu_ffn(**args)


def _cross_entropy(**kw):
    args = dict(input=LOGITS, target=TARGET, ignore_index=-100, reduction="mean") | kw
    return lambda: fasttx.cross_entropy(**args)


def _sdpa(**kw):
    args = dict(query=Q, key=Q, value=Q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False) | kw
    return lambda: fasttx.scaled_dot_product_attention(**args)


NAN, INF = math.nan, math.inf
_NORMS = (_layer_norm, _add_layer_norm, _rms_norm, _add_rms_norm)

# (call, the argument it gets wrong, the error expected)
CASES = [
    # the norms: normalized_shape, eps, the tensors, out_dtype
    *[(op(normalized_shape=v), "normalized_shape", TypeError) for op in _NORMS
      for v in (64.0, "8", [8.0], None, True, torch.tensor(8))],
    *[(op(normalized_shape=v), "normalized_shape", ValueError) for op in _NORMS
      for v in (-8, (4,), (3, 4, 8, 8), ())],
    *[(op(eps=v), "eps", TypeError) for op in (_layer_norm, _add_layer_norm) for v in (None, "1e-5", True, [1e-5])],
    *[(op(eps=v), "eps", ValueError) for op in _NORMS for v in (-1e-5, NAN, INF)],
    *[(op(eps=v), "eps", TypeError) for op in (_rms_norm, _add_rms_norm) for v in ("1e-5", True, [1e-5])],
    *[(op(x=v), "x", TypeError) for op in (*_NORMS, _bias_gelu, _softmax, _gelu_ffn)
      for v in ([[1.0] * 8], torch.ones(2, 8, dtype=torch.long))],
    *[(op(weight=v), "weight", TypeError) for op in _NORMS for v in ([1.0] * 8,)],
    *[(op(weight=torch.randn(7)), "weight", ValueError) for op in _NORMS],
    *[(op(bias=v), "bias", TypeError) for op in (_layer_norm, _add_layer_norm) for v in ([1.0] * 8, 1.0)],
    *[(op(bias=torch.randn(3)), "bias", ValueError) for op in (_layer_norm, _add_layer_norm)],
    *[(op(residual=[1.0]), "residual", TypeError) for op in (_add_layer_norm, _add_rms_norm)],
    *[(op(residual=torch.randn(2, 8)), "residual", ValueError) for op in (_add_layer_norm, _add_rms_norm)],
    *[(op(residual=X.to(dtype)), "residual", TypeError) for op in (_add_layer_norm, _add_rms_norm)
      for dtype in (torch.bfloat16, torch.float64)],
    *[(op(residual=X.to("meta")), "residual", ValueError) for op in (_add_layer_norm, _add_rms_norm)],
    *[(lambda op=op: op(X, 8, out_dtype=torch.int32), "out_dtype", TypeError)
      for op in (fasttx.layer_norm, fasttx.rms_norm)],
    *[(op(out_dtype=v), "out_dtype", TypeError) for op in (_add_layer_norm, _add_rms_norm)
      for v in (torch.int32, "float16")],
    (lambda: fasttx.layer_norm(X, 8, out_dtype="float16"), "out_dtype", TypeError),
    # bias_gelu
    *[(_bias_gelu(approximate=v), "approximate", ValueError) for v in ("fast", None, "")],
    (_bias_gelu(bias=[1.0] * 8), "bias", TypeError),
    (_bias_gelu(bias=torch.randn(3)), "bias", ValueError),
    # softmax
    *[(_softmax(scale=v), "scale", TypeError) for v in (None, "1", True, torch.tensor(1.0))],
    *[(_softmax(scale=v), "scale", ValueError) for v in (NAN, INF, -INF)],
    *[(_softmax(is_causal=v), "is_causal", TypeError) for v in (None, "yes", 1)],
    (_softmax(attn_mask=[[True]]), "attn_mask", TypeError),
    # gelu_ffn
    *[(_gelu_ffn(activation=v), "activation", ValueError) for v in ("swish", None)],
    *[(_gelu_ffn(**{name: [1.0]}), name, TypeError) for name in ("w1", "b1", "w2", "b2")],
    (_gelu_ffn(w1=torch.randn(16, 7)), "w1", ValueError),
    (_gelu_ffn(b1=torch.randn(15)), "b1", ValueError),
    (_gelu_ffn(w2=torch.randn(8, 15)), "w2", ValueError),
    (_gelu_ffn(b2=torch.randn(9)), "b2", ValueError),
    # cross_entropy
    *[(_cross_entropy(ignore_index=v), "ignore_index", TypeError) for v in (1.5, None, True, "-100")],
    *[(_cross_entropy(reduction=v), "reduction", ValueError) for v in ("avg", None, "batchmean")],
    (_cross_entropy(input=[[0.0]]), "input", TypeError),
    (_cross_entropy(target=[0, 1, 2, 3]), "target", TypeError),
    (_cross_entropy(target=TARGET.float()), "target", TypeError),
    (_cross_entropy(target=torch.tensor([0, 1, 5, 2])), "target", ValueError),
    # scaled_dot_product_attention
    *[(_sdpa(dropout_p=v), "dropout_p", TypeError) for v in (None, "0.1", True)],
    *[(_sdpa(dropout_p=v), "dropout_p", ValueError) for v in (-0.1, 1.5, NAN)],
    *[(_sdpa(scale=v), "scale", TypeError) for v in ("0.1", True)],
    *[(_sdpa(scale=v), "scale", ValueError) for v in (NAN, INF)],
    *[(_sdpa(is_causal=v), "is_causal", TypeError) for v in (None, "yes", 1)],
    *[(_sdpa(enable_gqa=v), "enable_gqa", TypeError) for v in (None, "no")],
    (_sdpa(query=[1.0]), "query", TypeError),
    (_sdpa(key=torch.randn(1, 2, 4, 7)), "key", ValueError),
    (_sdpa(attn_mask=[[True]]), "attn_mask", TypeError),
]


@pytest.mark.parametrize("call,name,error", CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_a_bad_argument_is_named(call, name, error):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "fasttx" in message, message
    assert re.search(rf"\b{name}\b", message), f"the error does not name {name!r}: {message}"


def test_linear_refuses_as_torch_does():
    # fasttx's linear is F.linear's drop-in, errors included (fasttx/ops/linear.py); torch's name the argument.
    for args, name in (((X.tolist(), W1), "input"), ((X, W1.tolist()), "weight")):
        with pytest.raises(TypeError, match=name):
            linear(*args)
        with pytest.raises(TypeError, match=name):
            F.linear(*args)


@pytest.mark.parametrize("eps", [0, 0.0, 1, 1e-12])
def test_good_scalars_still_pass(eps):
    # ints where torch takes floats, eps = 0, a torch.Size and a list for normalized_shape
    torch.testing.assert_close(fasttx.layer_norm(X, torch.Size([8]), W, B, eps), F.layer_norm(X, (8,), W, B, eps))
    torch.testing.assert_close(fasttx.rms_norm(X, [3, 8], None, eps), F.rms_norm(X, [3, 8], None, eps))
    torch.testing.assert_close(fasttx.add_rms_norm(X, X, [3, 8], None, eps),
                               fasttx.ops.add_rms_norm_ref(X, X, (3, 8), None, eps))
    torch.testing.assert_close(fasttx.softmax(X, scale=2), torch.softmax(2 * X, -1))
    torch.testing.assert_close(fasttx.cross_entropy(LOGITS, TARGET, ignore_index=1),
                               F.cross_entropy(LOGITS, TARGET, ignore_index=1))
