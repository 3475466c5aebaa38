"""Second derivatives (create_graph=True) through every op and module give PyTorch's answer.

A gradient penalty once trained without its penalty: the first-order gradients of the norms and of
bias_gelu came back from their kernels as constants, and nothing raised. Each op is checked on both
of its paths (the plain eager Function, which for the norms on CPU is the C++ fast path, and the
registered torch.library op that modes and tracers take) and on each CPU backend, with
torch.autograd.gradgradcheck in float64 and with a gradient penalty compared against PyTorch's own.
"""
import contextlib
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import fasttx
from fasttx.models import GPT, GPTConfig
from fasttx.ops import (add_layer_norm_ref, add_rms_norm_ref, bias_gelu_ref, cross_entropy_ref, gelu_ffn_ref,
                        layer_norm_ref, rms_norm_ref, scaled_dot_product_attention_ref, softmax_ref)
from fasttx.ops.linear import linear, linear_ref

from backend_params import skip_unless_runnable


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _on_path(path):
    """"eager": the plain call (autograd.Function, or the norms' C++ fast path); "registered": under a
    function mode, which sends every call to the torch.library op."""
    return _PassThrough() if path == "registered" else contextlib.nullcontext()


def _torch_reference():
    """PyTorch's own calls, with SDPA on its math backend: its CPU flash kernel has no double backward
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    return sdpa_kernel(SDPBackend.MATH)


def _leaves(dtype, *shapes):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def _op_cases(dtype=torch.float64):
    """name -> (differentiable tensors, fasttx's call, PyTorch's call). Small awkward shapes."""
    torch.manual_seed(0)
    x, r, w, b = _leaves(dtype, (3, 5), (3, 5), (5,), (5,))
    w1, b1, w2, b2 = _leaves(dtype, (6, 5), (6,), (4, 6), (4,))
    q, k, v = _leaves(dtype, (1, 2, 3, 4), (1, 1, 4, 4), (1, 1, 4, 4))
    scores, logits = _leaves(dtype, (2, 3, 4), (4, 5))
    target = torch.tensor([1, -100, 4, 0])
    keep = torch.tensor([[True, False, True, True], [False, True, True, False], [True, True, True, True]])
    mask = torch.randn(2, 3, 4, dtype=dtype)  # one per head, broadcast over the batch
    return {
        "layer_norm": ((x, w, b), lambda *t: fasttx.layer_norm(t[0], 5, t[1], t[2]),
                       lambda *t: layer_norm_ref(t[0], (5,), t[1], t[2])),
        "add_layer_norm": ((x, r, w, b), lambda *t: fasttx.add_layer_norm(t[0], t[1], 5, t[2], t[3]),
                           lambda *t: add_layer_norm_ref(t[0], t[1], (5,), t[2], t[3])),
        "rms_norm": ((x, w), lambda *t: fasttx.rms_norm(t[0], 5, t[1]), lambda *t: rms_norm_ref(t[0], (5,), t[1])),
        "add_rms_norm": ((x, r, w), lambda *t: fasttx.add_rms_norm(t[0], t[1], 5, t[2]),
                         lambda *t: add_rms_norm_ref(t[0], t[1], (5,), t[2])),
        "bias_gelu": ((x, b), lambda *t: fasttx.bias_gelu(*t), lambda *t: bias_gelu_ref(*t)),
        "bias_gelu_tanh": ((x, b), lambda *t: fasttx.bias_gelu(*t, "tanh"), lambda *t: bias_gelu_ref(*t, "tanh")),
        "softmax_causal": ((scores,), lambda s: fasttx.softmax(s, 0.7, is_causal=True),
                           lambda s: softmax_ref(s, 0.7, is_causal=True)),
        "softmax_bool_mask": ((scores,), lambda s: fasttx.softmax(s, 1.3, keep), lambda s: softmax_ref(s, 1.3, keep)),
        "cross_entropy": ((logits,), lambda t: fasttx.cross_entropy(t, target), lambda t: cross_entropy_ref(t, target)),
        "cross_entropy_sum": ((logits,), lambda t: fasttx.cross_entropy(t, target, reduction="sum"),
                              lambda t: cross_entropy_ref(t, target, reduction="sum")),
        "gelu_ffn": ((x, w1, b1, w2, b2), lambda *t: fasttx.gelu_ffn(*t), lambda *t: gelu_ffn_ref(*t)),
        "gelu_ffn_tanh_no_bias": ((x, w1, w2), lambda x, w1, w2: fasttx.gelu_ffn(x, w1, None, w2, None, "gelu_tanh"),
                                  lambda x, w1, w2: gelu_ffn_ref(x, w1, None, w2, None, "gelu_tanh")),
        "gelu_ffn_relu": ((x, w1, b1, w2, b2), lambda *t: fasttx.gelu_ffn(*t, "relu"),
                          lambda *t: gelu_ffn_ref(*t, "relu")),
        "attention_causal_gqa": (
            (q, k, v), lambda *t: fasttx.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True),
            lambda *t: scaled_dot_product_attention_ref(*t, is_causal=True, enable_gqa=True)),
        "attention_float_mask": (
            (q, k, v), lambda q, k, v: fasttx.scaled_dot_product_attention(q, k, v, mask, scale=0.3),
            lambda q, k, v: scaled_dot_product_attention_ref(q, k.expand(1, 2, 4, 4), v.expand(1, 2, 4, 4), mask,
                                                             scale=0.3)),
    }


OPS = list(_op_cases())
BACKENDS = ("cpu", "torch")


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _penalised_grads(call, tensors):
    """Gradients of loss + |d loss / d tensors|^2, the loss a fixed weighting of the outputs: the first
    backward gets gradients that do not require grad, the case that lost its penalty silently."""
    torch.manual_seed(1)
    outs = _outputs(call(*tensors))
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    return torch.autograd.grad(loss + sum(g.square().sum() for g in grads), tensors)


@pytest.mark.parametrize("path", ["eager", "registered"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_gradgradcheck(op, backend, path):
    skip_unless_runnable("cpu", backend)
    tensors, call, _ = _op_cases()[op]
    with fasttx.use_backend(backend), _on_path(path):
        assert torch.autograd.gradgradcheck(call, tensors)


@pytest.mark.parametrize("path", ["eager", "registered"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_gradient_penalty_matches_torch(op, backend, path):
    skip_unless_runnable("cpu", backend)
    tensors, call, reference = _op_cases()[op]
    with fasttx.use_backend(backend), _on_path(path):
        ours = _penalised_grads(call, tensors)
    with _torch_reference():
        theirs = _penalised_grads(reference, tensors)
    for i, (a, e) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, e, msg=lambda m: f"{op}, tensor {i}: {m}")


def _first(fn):
    return lambda *t: _outputs(fn(*t))[0]


def _transformed(fn, tensors):
    """torch.func's grad, grad of grad, jvp and vmap, and forward-mode AD, of fn at tensors."""
    torch.manual_seed(3)
    tangents = tuple(torch.randn_like(t) for t in tensors)
    scalar = lambda *t: sum((o * o.sin()).sum() for o in _outputs(fn(*t)))
    grads = torch.func.grad(scalar, argnums=tuple(range(len(tensors))))(*tensors)
    second = torch.func.grad(lambda *t: torch.func.grad(scalar)(*t).square().sum())(*tensors)
    _, jvp = torch.func.jvp(_first(fn), tensors, tangents)
    batched = torch.vmap(_first(fn), in_dims=(0, *[None] * (len(tensors) - 1)))(
        torch.stack([tensors[0], tensors[0] * 2]), *tensors[1:])
    with torch.autograd.forward_ad.dual_level():
        dual = _first(fn)(*(torch.autograd.forward_ad.make_dual(t, d) for t, d in zip(tensors, tangents)))
        forward_tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
    return (*grads, second, jvp, batched, forward_tangent)


@pytest.mark.parametrize("op", OPS)
def test_op_under_torch_func_and_forward_ad_matches_torch(op):
    """The Functions implement reverse mode only: under a transform the ops run their torch reference
    (a jvp through the registered op once came back silently wrong, forward-mode AD through the norms'
    C++ path without a tangent)."""
    tensors, call, reference = _op_cases()[op]
    tensors = tuple(t.detach() for t in tensors)
    ours = _transformed(call, tensors)
    with _torch_reference():
        theirs = _transformed(reference, tensors)
    for i, (a, e) in enumerate(zip(ours, theirs)):
        assert a is not None, f"{op}: result {i} missing"
        torch.testing.assert_close(a, e, msg=lambda m: f"{op}, result {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "bias_gelu", "gelu_ffn"])
def test_op_gradient_penalty_in_low_precision_has_its_term(op, dtype):
    """The kernels' own dtypes on the default path: the penalty's term is there (within rounding of the
    float64 truth), never missing."""
    skip_unless_runnable("cpu", "cpu")
    tensors, call, reference = _op_cases(dtype)[op]
    ours = _penalised_grads(call, tensors)
    with _torch_reference():
        truth = _penalised_grads(reference, [t.detach().double().requires_grad_() for t in tensors])
        torch_own = _penalised_grads(reference, tensors)
    for a, e, t in zip(ours, truth, torch_own):
        err, torch_err = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 3 * torch_err + (1e-4 if dtype == torch.float32 else 3e-2) * e.abs().max().item()


def test_linear_gradient_penalty_matches_torch():
    """fasttx.ops.linear, as the modules call it."""
    torch.manual_seed(0)
    x, w, b = _leaves(torch.float32, (7, 5), (3, 5), (3,))
    ours = _penalised_grads(linear, (x, w, b))
    theirs = _penalised_grads(linear_ref, (x, w, b))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_linear_gemm_function_gradient_penalty_matches_torch():
    """The Function of fasttx's fp32 CPU GEMMs, called directly (ops.linear takes it only where
    FASTTX_CPU_GEMM's rule says those GEMMs are faster than ATen's)."""
    from fasttx.ops.linear import _LinearFunction
    skip_unless_runnable("cpu", "cpu")
    torch.manual_seed(0)
    x, w, b = _leaves(torch.float32, (4, 3), (2, 3), (2,))
    ours = _penalised_grads(_LinearFunction.apply, (x, w, b))
    theirs = _penalised_grads(linear_ref, (x, w, b))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ---- modules: fasttx.nn and the GPT model ---------------------------------------------------------------

def _module_cases(dtype=torch.float64):
    """name -> (fasttx module, PyTorch's equivalent with the same parameters, input)."""
    torch.manual_seed(0)
    d, heads, hidden = 4, 2, 6
    factory = dict(dtype=dtype)

    def randomised(module):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        return module

    def twin(ours, theirs):
        theirs.load_state_dict(randomised(ours).state_dict())
        return ours, theirs

    x = torch.randn(2, 3, d, **factory)
    cases = {
        "LayerNorm": (*twin(fasttx.nn.LayerNorm(d, **factory), torch.nn.LayerNorm(d, **factory)), x),
        "RMSNorm": (*twin(fasttx.nn.RMSNorm(d, **factory), torch.nn.RMSNorm(d, **factory)), x),
        "GELUFFN": (*twin(fasttx.nn.GELUFFN(d, hidden, **factory),
                          torch.nn.ModuleDict({"fc1": torch.nn.Linear(d, hidden, **factory),
                                               "fc2": torch.nn.Linear(hidden, d, **factory)})), x),
        "MultiheadSelfAttention": (*twin(fasttx.nn.MultiheadSelfAttention(d, heads, **factory),
                                         torch.nn.MultiheadAttention(d, heads, batch_first=True, **factory)), x),
    }
    for norm_first in (True, False):
        ours = fasttx.nn.TransformerBlock(d, heads, hidden, norm_first=norm_first, **factory)
        theirs = torch.nn.TransformerEncoderLayer(d, heads, hidden, 0.0, "gelu", batch_first=True,
                                                  norm_first=norm_first, **factory)
        cases[f"TransformerBlock_{'pre' if norm_first else 'post'}_ln"] = (*twin(ours, theirs), x)
    for norm_first in (True, False):  # fasttx.patch's forward over torch's own layer
        theirs = torch.nn.TransformerEncoderLayer(d, heads, hidden, 0.0, "gelu", batch_first=True,
                                                  norm_first=norm_first, **factory)
        ours = copy.deepcopy(theirs)
        assert fasttx.patch(ours).replaced
        cases[f"patched nn.TransformerEncoderLayer_{'pre' if norm_first else 'post'}_ln"] = (*twin(ours, theirs), x)
    patched_norm = torch.nn.LayerNorm(d, **factory)
    assert fasttx.patch(patched_norm).replaced
    cases["patched nn.LayerNorm"] = (*twin(patched_norm, torch.nn.LayerNorm(d, **factory)), x)
    config = dict(vocab_size=7, block_size=5, n_layer=2, n_head=heads, d_model=d)
    gpt = GPT(GPTConfig(**config), **factory)
    eager = GPT(GPTConfig(**config, kernels="eager"), **factory)
    cases["GPT"] = (*twin(gpt, eager), torch.randint(0, 7, (2, 5)))
    return cases


def _call_equivalent(name, module, x):
    if name == "GELUFFN":
        return gelu_ffn_ref(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias)
    if name == "MultiheadSelfAttention":
        return module(x, x, x, need_weights=False)[0]
    if name == "GPT":
        return module(x)[0]
    return module(x)


MODULES = list(_module_cases())


@pytest.mark.parametrize("name", [m for m in MODULES if m != "GPT"])
def test_module_gradgradcheck(name):
    """Over the input (the parameters' terms are in the gradient penalty test below, which is cheaper)."""
    skip_unless_runnable("cpu", "cpu")
    module, _, x = _module_cases()[name]
    assert torch.autograd.gradgradcheck(module, (x[:1, :2].clone().requires_grad_(),))


def _penalised_module_grads(module, call, x):
    """{name: gradient} of loss + |d loss / d x|^2 over the input and the parameters; for token ids
    (GPT) the penalty is on the parameters' gradients instead."""
    params = dict(module.named_parameters())
    torch.manual_seed(1)
    if x.is_floating_point():
        x = x.clone().requires_grad_()
        inputs = {"input": x, **params}
        penalised = {"input": x}
    else:
        inputs = penalised = params
    out = call(x)
    loss = (out * torch.randn(out.shape, dtype=out.dtype)).sum()
    grads = torch.autograd.grad(loss, list(penalised.values()), create_graph=True)
    total = loss + sum(g.square().sum() for g in grads)
    return dict(zip(inputs, torch.autograd.grad(total, list(inputs.values()))))


@pytest.mark.parametrize("name", MODULES)
def test_module_gradient_penalty_matches_torch(name):
    """The parameters' and the input's gradients equal those of PyTorch's equivalent module, in
    training mode (the recomputed activations of TransformerBlock and GPT) and in eval mode."""
    skip_unless_runnable("cpu", "cpu")
    ours, theirs, x = _module_cases()[name]
    for training in (True, False):
        ours.train(training), theirs.train(training)
        mine = _penalised_module_grads(ours, (lambda idx: ours(idx)[0]) if name == "GPT" else ours, x)
        with _torch_reference():
            expected = _penalised_module_grads(theirs, lambda t: _call_equivalent(name, theirs, t), x)
        assert mine.keys() == expected.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], expected[key], msg=lambda m: f"{name}, {key}, training={training}: {m}")


class _Output(torch.nn.Module):
    """The module's output as the tests read it: fasttx's module, or PyTorch's equivalent."""

    def __init__(self, name, module, equivalent):
        super().__init__()
        self.name, self.module, self.equivalent = name, module, equivalent

    def forward(self, x):
        if self.equivalent:
            return _call_equivalent(self.name, self.module, x)
        return self.module(x)[0] if self.name == "GPT" else self.module(x)


@pytest.mark.parametrize("name", MODULES)
def test_module_under_torch_func_matches_torch(name):
    """torch.func.grad and its second order over the parameters (functional_call), as functorch-style
    training loops take them: the same as PyTorch's equivalent module."""
    skip_unless_runnable("cpu", "cpu")
    ours, theirs, x = _module_cases()[name]

    def transformed(module, equivalent):
        wrapper = _Output(name, module, equivalent)
        params = {f"module.{k}": p.detach() for k, p in module.named_parameters()}
        torch.manual_seed(1)
        weight = torch.randn(wrapper(x).shape, dtype=torch.float64)
        loss = lambda params: (torch.func.functional_call(wrapper, params, (x,)) * weight).sum()
        penalty = lambda params: sum(g.square().sum() for g in torch.func.grad(loss)(params).values())
        return {**torch.func.grad(loss)(params), **{f"{k} (second order)": g
                                                      for k, g in torch.func.grad(penalty)(params).items()}}

    mine = transformed(ours, False)
    with _torch_reference():
        expected = transformed(theirs, True)
    assert mine.keys() == expected.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], expected[key], msg=lambda m: f"{name}, {key}: {m}")
