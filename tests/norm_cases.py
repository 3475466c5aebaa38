"""The norm ops as fasttx and as PyTorch compute them, and a runner, shared by the reference
and the interpreter tests."""
import torch
import torch.nn.functional as F

import fasttx

# Explicit: eps=None means finfo(dtype).eps, which differs between the dtype under test and the fp64 truth.
RMS_EPS = 1e-6


def fasttx_fn(op):
    if op == "layer_norm":
        return lambda x, r, w, b: (fasttx.layer_norm(x, x.shape[-1:], w, b),)
    if op == "add_layer_norm":
        return lambda x, r, w, b: fasttx.add_layer_norm(x, r, x.shape[-1:], w, b)
    if op == "add_rms_norm":
        return lambda x, r, w, b: fasttx.add_rms_norm(x, r, x.shape[-1:], w, RMS_EPS)
    return lambda x, r, w, b: (fasttx.rms_norm(x, x.shape[-1:], w, RMS_EPS),)


def torch_fn(op):
    if op == "layer_norm":
        return lambda x, r, w, b: (F.layer_norm(x, x.shape[-1:], w, b),)
    if op == "add_layer_norm":
        return lambda x, r, w, b: (F.layer_norm(x + r, x.shape[-1:], w, b), x + r)
    if op == "add_rms_norm":
        return lambda x, r, w, b: (F.rms_norm(x + r, x.shape[-1:], w, RMS_EPS), x + r)
    return lambda x, r, w, b: (F.rms_norm(x, x.shape[-1:], w, RMS_EPS),)


def run(fn, inputs, grads, cast=None):
    """(outputs, grads of x, residual, weight, bias) of ``fn``, its inputs cast to ``cast`` when given."""
    leaves = [None if t is None else (t.to(cast) if cast else t).detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs, [g.to(cast) if cast else g for g in grads[:len(outs)]])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]
